"""The shipped knowledge-distillation demo: teacher, KD data, configs, and that distillation works.

``demo/teacher`` (trained by ``configs/teacher_sft.yaml``) wrote ``demo/data/kd_train`` and
``demo/data/kd_eval`` with ``python -m jaxpref.teacher`` (``configs/kd_teacher.yaml``); the student of
``configs/kd.yaml`` (``demo/tiny-llama``, random init) distils from them. The slow tests train that
student (shortened) and assert on held-out numbers: the KL to the teacher falls, and the KD student
beats a CE-only student trained on the same rows for the same steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxpref.data.settings import DataSettings

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
TEACHER = REPO / "demo" / "teacher"
STUDENT = REPO / "demo" / "tiny-llama"
KD_TRAIN = REPO / "demo" / "data" / "kd_train"
KD_EVAL = REPO / "demo" / "data" / "kd_eval"

# Shortened configs/kd.yaml for the slow tests: 100 steps of 8 x 128 packed tokens over the first 500
# rows of demo/data/kd_train (8 epochs; kd.yaml runs 300 steps of 8 x 256 tokens over all 2000).
# Measured on seeds 0 and 1 (README "Knowledge distillation demo"); the tests run seed 0.
STEPS = 100
SHORT = ["sequence_len=128", f"max_steps={STEPS}", "warmup_steps=10", "datasets.0.split=train[:500]"]
KL_START_MIN = 4.0  # held-out KL of the random-init student (measured 5.76)
KL_RATIO = 0.3  # end / start held-out KL after STEPS (measured 0.13, 0.15)
TOP1_MIN = 0.5  # held-out top-1 agreement with the teacher after STEPS (measured 0.63, 0.58)
# The KD-vs-CE comparison trains both students on fewer rows (250: 16 epochs in 100 steps), where the
# teacher's full top-k signal per token matters most (held-out CE ratio KD / CE-only measured 0.965 and
# 0.921 on seeds 0 and 1; over 500 rows the gap was 0.988 and 0.948, too thin to assert on).
SCARCE = "datasets.0.split=train[:250]"
CE_RATIO = 0.98  # KD student's held-out CE / the CE-only student's, at most
# bfloat16 parameters and compute (axolotl's bfloat16: true; float32 optimizer state, stochastic rounding):
# held-out KL / the float32 student's at the same steps, at most (measured 0.996 and 0.999 on seeds 0 and 1;
# rounding to nearest instead gave 1.13 and 1.02, bfloat16 compute alone with float32 parameters 1.09 and
# 0.91; scripts/bench_bf16_params.py).
BF16_KL_RATIO = 1.10


# ------------------------------------------------------------------------------------------ fast


def test_kd_configs_validate():
    from jaxpref.assembly import objective_name
    from jaxpref.config import load_config
    from jaxpref.teacher_pass import load_teacher_config

    kd = load_config(CONFIGS / "kd.yaml")
    assert objective_name(kd) == "kd" and kd.random_init_weights and kd.base_model == "demo/tiny-llama"
    assert [d.data_files for d in kd.datasets] == [["demo/data/kd_train/part-*.parquet"]]
    assert [d.data_files for d in kd.test_datasets] == [["demo/data/kd_eval/part-*.parquet"]]
    assert kd.datasets[0].logprobs_field == "logprobs" and kd.datasets[0].temperature == 1.0

    kd_lora = load_config(CONFIGS / "kd_lora.yaml")
    assert objective_name(kd_lora) == "kd" and kd_lora.adapter == "lora" and kd_lora.lora_target_linear

    llama = load_config(CONFIGS / "kd_llama3.yaml")
    assert objective_name(llama) == "kd" and llama.sample_packing and llama.compute_dtype == "bfloat16"
    assert (llama.mesh.data, llama.mesh.fsdp) == (2, 4)
    assert llama.datasets[0].type == "axolotl.integrations.kd.chat_template"

    teacher_sft = load_config(CONFIGS / "teacher_sft.yaml")
    assert objective_name(teacher_sft) == "sft" and teacher_sft.random_init_weights
    teacher_pass = load_teacher_config(CONFIGS / "kd_teacher.yaml")
    assert teacher_pass.kd_teacher_model == "demo/teacher" and teacher_pass.kd_teacher_top_k == 16


def test_kd_llama3_dry_run_offline(capsys):
    """The real-run config validates and sizes Llama-3.2-1B from the shipped config.json alone."""
    from jaxpref.train import main

    assert main(["--config", str(CONFIGS / "kd_llama3.yaml"), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 1235814400" in out  # Llama-3.2-1B (tied embeddings): 1.24B


def test_shipped_teacher_and_kd_data_fit_together():
    from transformers import AutoConfig, AutoTokenizer

    teacher_cfg, student_cfg = AutoConfig.from_pretrained(TEACHER), AutoConfig.from_pretrained(STUDENT)
    assert teacher_cfg.vocab_size == student_cfg.vocab_size
    assert (teacher_cfg.hidden_size, teacher_cfg.num_hidden_layers) > (student_cfg.hidden_size, 4)
    # the very same tokenizer as the student's
    assert json.loads((TEACHER / "tokenizer.json").read_text()) == json.loads((STUDENT / "tokenizer.json").read_text())
    assert AutoTokenizer.from_pretrained(TEACHER).chat_template == AutoTokenizer.from_pretrained(STUDENT).chat_template

    for path, rows in ((KD_TRAIN, 2000), (KD_EVAL, 200)):
        info = json.loads((path / "teacher_info.json").read_text())
        assert (info["teacher"], info["top_k"], info["rows_out"], info["format"]) == (
            "demo/teacher",
            16,
            rows,
            "parquet",
        )
    size = sum(p.stat().st_size for d in (TEACHER, KD_TRAIN, KD_EVAL) for p in d.rglob("*") if p.is_file())
    assert size < 12_000_000, f"the KD demo takes {size / 1e6:.1f} MB; keep it a few MB"

    accuracy = json.loads((TEACHER / "accuracy.json").read_text())
    # greedy exact match on the 200 held-out prompts (scripts/build_kd_demo.py, decoded by transformers)
    assert accuracy["all"]["n"] == 200 and accuracy["per_task"]["sort"]["accuracy"] >= 0.9


@pytest.mark.slow
def test_kd_data_are_the_shipped_teachers_top_k():
    """Stored targets == transformers' (torch) top-16 log-softmax of demo/teacher on the same tokens."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxpref.data.formats.kd import read_kd_dataset

    model = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(TEACHER)
    rows = read_kd_dataset(sorted(KD_EVAL.glob("part-*.parquet"))[0]).select(range(8))
    for row in rows:
        ids = tok.apply_chat_template(row["messages"], return_dict=True)["input_ids"]
        assert len(row["target_token_ids"]) == len(ids)  # token-aligned: one row per token, row 0 null
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()
        stored = [(i, t, lp) for i, (t, lp) in enumerate(zip(row["target_token_ids"], row["logprobs"])) if t]
        assert len(stored) >= 2
        for i, t, lp in stored:  # row i: the distribution over token i, predicted at i - 1
            expect = np.sort(logp[i - 1])[::-1][:16]
            np.testing.assert_allclose(np.sort(lp)[::-1], expect, atol=2e-3)
            np.testing.assert_allclose(lp, logp[i - 1][t], atol=2e-3)


# ------------------------------------------------------------------------------------------ slow


def _config(tmp: Path, *extra: str):
    from jaxpref.config import load_config

    return load_config(
        CONFIGS / "kd.yaml",
        [
            *SHORT,
            f"base_model={STUDENT}",
            f"datasets.0.data_files=[{KD_TRAIN}/part-*.parquet]",
            f"test_datasets.0.data_files=[{KD_EVAL}/part-*.parquet]",
            f"dataset_prepared_path={tmp}/prepared",
            f"output_dir={tmp}/out",
            *extra,
        ],
    )


class KDDemo:
    """The student of configs/kd.yaml (shortened), trained in-process; held-out KD metrics of any model."""

    def __init__(self, tmp: Path, seed: int = 0):
        from jaxpref import sharding as shd

        self.tmp, self.seed = tmp, seed
        self.mesh = shd.make_mesh(None)
        self.kd_cfg = _config(tmp, f"seed={seed}")
        self.kd_objective, self.tokenizer, self.kd_data = self._setup(self.kd_cfg)

    @staticmethod
    def _setup(cfg):
        from jaxpref.assembly import build_data, objective_name
        from jaxpref.data import load_tokenizer
        from jaxpref.objectives import build_objective

        objective = build_objective(cfg, objective_name(cfg))
        tokenizer = load_tokenizer(DataSettings.from_config(cfg))
        return objective, tokenizer, build_data(DataSettings.from_config(cfg), tokenizer, objective.data)

    def fresh_student(self, cfg=None):
        from jaxpref.assembly import build_model

        return build_model(cfg or self.kd_cfg, len(self.tokenizer), self.mesh)

    def held_out(self, model) -> dict[str, float]:
        """Count-weighted means over the eval split's trainable tokens: kd_loss = KL(teacher top-16 ||
        student) at T = 1, ce_loss = CE on the true next tokens, top1_agreement."""
        import optax

        from jaxpref import lora
        from jaxpref.trainer import Trainer

        ev = Trainer(model, self.kd_objective, optax.sgd(0.0), mesh=self.mesh, trainable=lora.trainable_filter(model))
        return ev.evaluate(self.kd_data.eval_batches())

    def train(self, *extra: str):
        """A student trained for STEPS optimizer steps with configs/kd.yaml (+ ``extra`` overrides)."""
        from jaxpref import lora
        from jaxpref.optim import make_optimizer
        from jaxpref.trainer import Trainer

        cfg = _config(self.tmp, f"seed={self.seed}", *extra) if extra else self.kd_cfg
        objective, _, data = self._setup(cfg) if extra else (self.kd_objective, None, self.kd_data)
        model = self.fresh_student(cfg)
        tx, _ = make_optimizer(cfg, STEPS)
        trainer = Trainer(model, objective, tx, mesh=self.mesh, trainable=lora.trainable_filter(model), seed=cfg.seed)
        batches = data.train_iterator(None)
        for _ in range(STEPS):
            stats = trainer.train_step([next(batches)])
            assert stats["finite"]
        return trainer.model()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return KDDemo(tmp_path_factory.mktemp("kd_demo"))


@pytest.fixture(scope="module")
def kd_student(demo):
    return demo.train()


@pytest.mark.slow
def test_distillation_brings_the_student_close_to_the_teacher(demo, kd_student):
    """Held-out KL(teacher || student) over the eval split's stored targets falls to a small fraction."""
    start = demo.held_out(demo.fresh_student())
    end = demo.held_out(kd_student)
    assert start["kd_loss"] > KL_START_MIN  # a random-init student is far from the teacher
    assert end["kd_loss"] < KL_RATIO * start["kd_loss"], (start, end)
    assert end["top1_agreement"] > TOP1_MIN, end


@pytest.mark.slow
def test_kd_student_beats_ce_only_student_on_held_out_ce(demo):
    """Same rows, seed, steps and learning rate; only the objective differs (kd vs sft on the labels)."""
    kd_student, ce_student = demo.train(SCARCE), demo.train("kd_trainer=false", SCARCE)
    kd, ce = demo.held_out(kd_student), demo.held_out(ce_student)
    assert kd["ce_loss"] < CE_RATIO * ce["ce_loss"], (kd, ce)
    assert kd["kd_loss"] < ce["kd_loss"], (kd, ce)


@pytest.mark.slow
def test_bfloat16_parameters_distil_as_well_as_float32(demo, kd_student):
    """The same run with bfloat16: true reaches a held-out KL within BF16_KL_RATIO of the float32 one."""
    bf16_student = demo.train("bfloat16=true")
    assert {x.dtype.name for x in jax.tree.leaves(nnx.state(bf16_student, nnx.Param))} == {"bfloat16"}
    f32, bf16 = demo.held_out(kd_student), demo.held_out(bf16_student)
    assert bf16["kd_loss"] < BF16_KL_RATIO * f32["kd_loss"], (bf16, f32)
    assert bf16["top1_agreement"] > TOP1_MIN, bf16
