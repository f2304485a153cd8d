"""Every objective x {full, LoRA} x param_dtype {float32, bfloat16} x compute_dtype {float32, bfloat16}
trains: two real steps of the shipped config (shortened), through the same assembly as
``python -m jaxpref.train`` (``build_data``, ``build_trainer``: model, LoRA, score head, reference pass,
companions, optimizer), asserting the dtype policy of jaxpref/precision.py on every array, a finite
loss, and that every trainable array moved while frozen ones did not.

One test per (objective, tuning) builds the data once and runs the four dtype pairs on it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref import sharding as shd
from jaxpref.config import load_config
from jaxpref.data.settings import DataSettings
from tests.trainer.test_kd_demo import CONFIGS, KD_TRAIN, REPO

COMMON = [
    "max_steps=2",
    "micro_batch_size=2",
    "gradient_accumulation_steps=1",
    "warmup_steps=0",
    "learning_rate=1e-3",
    "test_datasets=",
    "use_tensorboard=false",
    "dataset_processes=1",
]
# objective -> (shipped config, overrides making it tiny)
OBJECTIVES = {
    "sft": ("sft.yaml", ["datasets.0.split=train[:16]", "sequence_len=128"]),
    "kd": ("kd.yaml", [f"datasets.0.data_files=[{KD_TRAIN}/part-*.parquet]", "datasets.0.split=train[:16]",
                       "sequence_len=128"]),
    "kd_online": ("sft.yaml", ["datasets.0.split=train[:16]", "sequence_len=128", "kd_trainer=true",
                               f"kd_teacher_model={REPO / 'demo' / 'teacher'}", "kd_teacher_top_k=8",
                               "kd_ce_alpha=0.5"]),
    "dpo": ("dpo.yaml", ["datasets.0.split=train[:8]", "datasets.1.split=train[:8]"]),
    "ipo": ("ipo.yaml", ["datasets.0.split=train[:8]"]),
    "orpo": ("orpo.yaml", ["datasets.0.split=train[:8]"]),
    "kto": ("kto.yaml", ["datasets.0.split=train[:8]", "gradient_checkpointing=true"]),
    "simpo": ("simpo.yaml", ["datasets.0.split=train[:8]"]),
    "reward": ("reward.yaml", ["datasets.0.split=train[:8]"]),
}
LORA = ["adapter=lora", "lora_r=4", "lora_alpha=8", "lora_target_linear=true"]
DTYPES = [("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """demo/tiny-llama's random init (seed 0) as a float32 checkpoint: loading it costs no compilation."""
    from jaxpref import models

    path = tmp_path_factory.mktemp("tiny_checkpoint")
    models.save_pretrained(models.from_config(models.load_model_config(REPO / "demo" / "tiny-llama"), seed=0), path)
    return path


def _config(objective: str, tuning: str, tmp_path, checkpoint, param_dtype="float32", compute_dtype="float32"):
    name, overrides = OBJECTIVES[objective]
    return load_config(
        CONFIGS / name,
        [*COMMON, *overrides, *(LORA if tuning == "lora" else []), f"output_dir={tmp_path}/out",
         f"param_dtype={param_dtype}", f"compute_dtype={compute_dtype}", f"base_model={checkpoint}",
         "random_init_weights=false", f"tokenizer_config={REPO / 'demo' / 'tiny-llama'}"],
    )


def _variables(state):
    return jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _host(state):
    return [np.asarray(jax.device_get(v.get_value()), np.float32) for v in _variables(state)]


@pytest.mark.slow
@pytest.mark.parametrize("tuning", ["full", "lora"])
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_two_steps_in_every_dtype(objective, tuning, tmp_path, checkpoint):
    from jaxpref.assembly import build_data, build_trainer, objective_name
    from jaxpref.data import load_tokenizer
    from jaxpref.objectives import build_objective

    base = _config(objective, tuning, tmp_path, checkpoint)
    obj = build_objective(base, objective_name(base))
    assert obj.name == {"kd_online": "kd"}.get(objective, objective)
    tokenizer = load_tokenizer(DataSettings.from_config(base))
    data = build_data(DataSettings.from_config(base), tokenizer, obj.data)
    mesh = shd.make_mesh(None)
    for param_dtype, compute_dtype in DTYPES:
        cfg = _config(objective, tuning, tmp_path, checkpoint, param_dtype, compute_dtype)
        trainer, _ = build_trainer(cfg, obj, data, tokenizer, mesh, 2)
        where = f"{objective}/{tuning}/params {param_dtype}/compute {compute_dtype}"

        # the dtype policy (jaxpref/precision.py)
        for var in _variables(trainer.params):
            lora_adapter = isinstance(var, nnx.LoRAParam) and var.get_value().ndim >= 3  # lora_a / lora_b
            expected = jnp.float32 if lora_adapter else jnp.dtype(param_dtype)
            assert var.get_value().dtype == expected, (where, type(var).__name__, var.get_value().dtype)
        for var in _variables(trainer.frozen_view()):  # on CPU held as uint16 views (jaxpref.bit_patterns)
            if isinstance(var, nnx.Param):
                assert var.get_value().dtype == jnp.dtype(param_dtype), where
        floating = [x for x in jax.tree.leaves(trainer.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floating and all(x.dtype == jnp.float32 for x in floating), where

        dtypes = [x.dtype for x in jax.tree.leaves((trainer.params, trainer.opt_state))]
        before, frozen_before = _host(trainer.params), _host(trainer.frozen)
        batches = data.train_iterator(None)
        for _ in range(2):
            stats = trainer.train_step([next(batches)])
            assert stats["finite"] and np.isfinite(stats["loss"]), (where, stats)
        after = _host(trainer.params)
        unmoved = [i for i, (a, b) in enumerate(zip(before, after)) if np.array_equal(a, b)]
        assert not unmoved, f"{where}: {len(unmoved)} of {len(after)} trainable arrays did not move"
        for a, b in zip(frozen_before, _host(trainer.frozen)):
            np.testing.assert_array_equal(a, b)
        assert [x.dtype for x in jax.tree.leaves((trainer.params, trainer.opt_state))] == dtypes, where
