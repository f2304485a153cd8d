"""orbax checkpoints of trainer state: exact round trip, keep-N, partial saves ignored; log rewind."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpref.checkpoint import Checkpointer
from jaxpref.logs import RunLogger
from jaxpref.sharding import make_mesh
from jaxpref.trainer import Trainer

from .test_trainer import TinyLM, ce_objective, make_batches


def _trainer(param_dtype=jnp.float32):
    model = TinyLM(rngs=nnx.Rngs(0), param_dtype=param_dtype)
    return Trainer(model, ce_objective(), optax.adamw(1e-2), mesh=make_mesh(None))


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_save_restore_continues_identically(tmp_path, param_dtype):
    batches = make_batches(6)
    ref = _trainer(param_dtype)
    ref_losses = [ref.train_step([b])["loss"] for b in batches]

    a = _trainer(param_dtype)
    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
    for b in batches[:3]:
        a.train_step([b])
    ckpt.save(3, a.params, a.opt_state, {"step": 3, "data_state": [{"next_index": 3}]})
    ckpt.wait()

    b_tr = _trainer(param_dtype)  # fresh weights: the restore must overwrite all of them
    params, opt, meta = ckpt.restore(ckpt.latest_step(), b_tr.params, b_tr.opt_state)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(param_dtype)}
    assert {x.dtype for x in jax.tree.leaves(opt) if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    b_tr.restore_state(params, opt, meta["step"])
    assert meta["data_state"] == [{"next_index": 3}]
    resumed = [b_tr.train_step([b])["loss"] for b in batches[3:]]
    np.testing.assert_array_equal(resumed, ref_losses[3:])
    ckpt.close()


def test_keep_n_and_partial_checkpoint_ignored(tmp_path):
    t = _trainer()
    ckpt = Checkpointer(tmp_path, max_to_keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, t.params, t.opt_state, {"step": step, "data_state": [None]})
    ckpt.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "3"]
    # A save killed half-way leaves only a temporary directory; it is not a checkpoint.
    (tmp_path / "4.orbax-checkpoint-tmp-123").mkdir()
    again = Checkpointer(tmp_path, max_to_keep=2)
    assert again.latest_step() == 3
    again.close()


def test_run_logger_rewinds_on_resume(tmp_path):
    log = RunLogger(tmp_path, total_steps=5, show_progress=False)
    for s in range(1, 6):
        log.log(s, "train", {"loss": float(s)})
    log.close()
    resumed = RunLogger(tmp_path, total_steps=5, start_step=3, show_progress=False)
    resumed.log(4, "train", {"loss": 40.0})
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert any((tmp_path / "runs").iterdir())


def test_restore_shapes_mismatch_is_user_error(tmp_path):
    from jaxpref.errors import UserError

    t = _trainer()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, t.params, t.opt_state, {"step": 1, "data_state": [None]})
    ckpt.close()
    other = Trainer(TinyLM(vocab=13, rngs=nnx.Rngs(0)), ce_objective(), optax.adamw(1e-2), mesh=make_mesh(None))
    with pytest.raises(UserError, match="does not match this config"):
        Checkpointer(tmp_path).restore(1, other.params, other.opt_state)


def test_restore_into_another_param_dtype_is_user_error(tmp_path):
    """orbax would cast silently: a float32 run resumed with param_dtype bfloat16 (or the reverse)."""
    from jaxpref.errors import UserError

    t = _trainer(jnp.float32)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, t.params, t.opt_state, {"step": 1, "data_state": [None]})
    ckpt.close()
    other = _trainer(jnp.bfloat16)
    with pytest.raises(UserError, match="its params are float32 but this config builds them as bfloat16"):
        Checkpointer(tmp_path).restore(1, other.params, other.opt_state)
