"""load_config: files, YAML errors with lines, overrides, empty values, paths, warnings."""

from __future__ import annotations

import logging
import os

import pytest

from jaxpref.config import apply_overrides, load_config, parse_override
from jaxpref.errors import ConfigError

BASE = """
base_model: org/model
learning_rate: 1.0e-4
datasets:
  - path: org/data
    type: chat_template
  - path: org/other
    type: chatml.intel
"""


def load_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_loads_a_file(write_yaml):
    path = write_yaml(BASE)
    cfg = load_config(path)
    assert cfg.base_model == "org/model" and len(cfg.datasets) == 2
    assert cfg.config_path == path and cfg.warnings == ()


def test_missing_file_and_directory(tmp_path):
    assert f"{tmp_path / 'nope.yaml'}: config file not found" in load_error(tmp_path / "nope.yaml")
    assert "is a directory" in load_error(tmp_path)


def test_yaml_syntax_error_names_file_and_line(write_yaml):
    path = write_yaml("base_model: x\nlearning_rate: [1, 2\nseed: 3\n")
    msg = load_error(path)
    assert msg.startswith(f"{path}:3:") and "invalid YAML" in msg


def test_not_a_mapping_or_empty(write_yaml):
    assert "must be a mapping of key: value lines, not a list" in load_error(write_yaml("- a\n- b\n"))
    assert "the config file is empty" in load_error(write_yaml("# nothing\n"))


def test_problems_carry_line_numbers(write_yaml):
    path = write_yaml(BASE + "lerning_rate: 3\nmicro_batch_size: 0\n")
    msg = load_error(path)
    assert msg.startswith(f"{path}: 2 problems:")
    assert "line 8: unknown key 'lerning_rate' (did you mean 'learning_rate'?)" in msg
    assert "line 9: micro_batch_size: must be >= 1, got 0" in msg
    single = load_error(write_yaml(BASE + "seed: abc\n"))
    assert single.endswith(":8: seed: expected an integer, got 'abc'")


def test_yaml_exponent_floats(write_yaml):
    cfg = load_config(write_yaml(BASE.replace("1.0e-4", "1e-4")))
    assert cfg.learning_rate == pytest.approx(1e-4)


def test_empty_values_mean_unset(write_yaml):
    cfg = load_config(write_yaml(BASE + "wandb_project:\nlr_scheduler:\nmesh:\n  fsdp:\nsave_total_limit:\n"))
    assert cfg.wandb_project is None and cfg.lr_scheduler == "cosine" and cfg.mesh.fsdp == 1
    assert cfg.save_total_limit is None


def test_overrides(write_yaml):
    cfg = load_config(
        write_yaml(BASE),
        [
            "learning_rate=1e-5",
            "sample_packing=true",
            "mesh.fsdp=4",
            "mesh.data=1",
            "datasets.1.path=local/x.jsonl",
            "datasets[0].split=test",
            "adapter=lora",
            "lora_target_modules=[q_proj,v_proj]",
            "wandb_project=",
            "fused_kernel.impl=xla_chunked",
        ],
    )
    assert cfg.learning_rate == pytest.approx(1e-5) and cfg.sample_packing is True
    assert (cfg.mesh.data, cfg.mesh.fsdp) == (1, 4)
    assert cfg.datasets[1].path == "local/x.jsonl" and cfg.datasets[0].split == "test"
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.wandb_project is None
    assert cfg.fused_kernel.impl == "xla_chunked"


def test_override_errors(write_yaml):
    path = write_yaml(BASE)
    assert "datasets has 2 entries (indexes 0-1)" in load_error(path, ["datasets.2.path=x"])
    assert "expected key=value" in load_error(path, ["learning_rate"])
    assert "datasets is a list; index it" in load_error(path, ["datasets.path=x"])
    assert "learning_rate is 0.0001, not a mapping" in load_error(path, ["learning_rate.x=1"])
    assert "is not a key path" in load_error(path, ["a..b=1"])
    assert "test_datasets is not set; add its entries" in load_error(path, ["test_datasets.0.path=x"])
    msg = load_error(path, ["micro_batch_size=0"])
    assert "micro_batch_size: must be >= 1, got 0 (command-line override)" in msg
    msg = load_error(path, ["lerning_rate=1"])
    assert "unknown key 'lerning_rate' (did you mean 'learning_rate'?)" in msg


def test_apply_overrides_copies_and_reports_paths():
    data = {"mesh": {"fsdp": 1}, "datasets": [{"path": "a"}]}
    out, touched = apply_overrides(data, ["mesh.tensor=2", "datasets.0.path=b", "new.nested=x"])
    assert out == {"mesh": {"fsdp": 1, "tensor": 2}, "datasets": [{"path": "b"}], "new": {"nested": "x"}}
    assert data == {"mesh": {"fsdp": 1}, "datasets": [{"path": "a"}]}
    assert touched == ["mesh.tensor", "datasets[0].path", "new.nested"]
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    assert parse_override("x=hello world") == (["x"], "hello world")


def test_ignored_keys_warn_once_each(write_yaml, caplog):
    text = BASE + "flash_attention: true\nsdp_attention: true\ndeepspeed: ds.json\ntf32: false\n"
    with caplog.at_level(logging.WARNING, logger="jaxpref.config"):
        cfg = load_config(write_yaml(text), ["torch_compile=true"])
    assert cfg.warnings == (
        "ignored: flash_attention (a CUDA attention switch; jaxpref picks attention per backend, see docs/design.md)",
        "ignored: sdp_attention (a CUDA attention switch; jaxpref picks attention per backend, see docs/design.md)",
        "ignored: deepspeed (a torch distributed setting; jaxpref shards over the mesh (data, fsdp, "
        "tensor) on every host)",
        "ignored: torch_compile (torch.compile; the jaxpref train step is always compiled with jax.jit)",
    )
    assert caplog.messages == list(cfg.warnings)  # tf32: false ignores nothing, so no warning


def test_dataset_level_ignored_keys_warn_once(write_yaml):
    text = BASE.replace("type: chatml.intel", "type: chatml.intel\n    shards: 4").replace(
        "type: chat_template", "type: chat_template\n    shards: 2"
    )
    cfg = load_config(write_yaml(text))
    expected = "ignored: datasets[].shards (axolotl dataset sharding/preprocessing, not implemented)"
    assert cfg.warnings == (expected,)


def test_duplicate_keys_warn(write_yaml):
    cfg = load_config(write_yaml(BASE + "learning_rate: 2.0e-5\n"))
    assert cfg.learning_rate == 2e-5
    assert len(cfg.warnings) == 1 and "duplicate key 'learning_rate' (first on line 2)" in cfg.warnings[0]


def test_paths_resolve_against_cwd_then_the_config_dir(tmp_path, monkeypatch, write_yaml):
    conf_dir = tmp_path / "conf"
    (conf_dir / "model").mkdir(parents=True)
    (conf_dir / "data").mkdir()
    (conf_dir / "data" / "train.jsonl").write_text("{}\n")
    (conf_dir / "tmpl.jinja").write_text("{{ x }}")
    work = tmp_path / "work"
    (work / "model").mkdir(parents=True)  # exists in the CWD too: the CWD wins
    monkeypatch.chdir(work)
    path = write_yaml(
        """
        base_model: model
        tokenizer_config: model
        lora_model_dir: missing_adapter
        chat_template_jinja: tmpl.jinja
        learning_rate: 1.0e-4
        output_dir: out
        datasets:
          - path: data/train.jsonl
          - path: Intel/orca_dpo_pairs
          - ds_type: json
            data_files: [data/*.jsonl, nothing.jsonl]
        """,
        name="conf/config.yaml",
    )
    cfg = load_config(path)
    assert cfg.base_model == "model" and cfg.tokenizer_config == "model"
    assert cfg.lora_model_dir == "missing_adapter"  # exists nowhere: left for the loader to report
    assert cfg.chat_template_jinja == os.path.join(conf_dir, "tmpl.jinja")
    assert cfg.datasets[0].path == os.path.join(conf_dir, "data", "train.jsonl")
    assert cfg.datasets[1].path == "Intel/orca_dpo_pairs"  # a hub id
    assert cfg.datasets[2].data_files == [os.path.join(conf_dir, "data", "*.jsonl"), "nothing.jsonl"]
    assert cfg.output_dir == "out"  # relative to the CWD, never rewritten


def test_inline_jinja_template_is_not_a_path(write_yaml):
    template = '"{% for m in messages %}{{ m }}{% endfor %}"'
    cfg = load_config(write_yaml(BASE + f"chat_template_jinja: {template}\n"))
    assert cfg.chat_template == "jinja" and cfg.chat_template_jinja.startswith("{%")


def test_require_datasets_false(write_yaml):
    cfg = load_config(write_yaml("base_model: m\nlearning_rate: 0.1\n"), require_datasets=False)
    assert cfg.datasets is None
