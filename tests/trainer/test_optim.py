"""Learning-rate schedules and AdamW against PyTorch / transformers (the axolotl reference)."""

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.optim import make_optimizer, make_schedule

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _cfg(**kw):
    base = dict(
        learning_rate=1e-3, lr_scheduler="cosine", warmup_steps=None, warmup_ratio=None, cosine_min_lr_ratio=None,
        optimizer="adamw", weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=None,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def _hf_lrs(kind, total, warmup, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    fn = {
        "cosine": transformers.get_cosine_schedule_with_warmup,
        "linear": transformers.get_linear_schedule_with_warmup,
        "constant": transformers.get_constant_schedule_with_warmup,
        "cosine_min": transformers.get_cosine_with_min_lr_schedule_with_warmup,
    }[kind]
    args = {} if kind == "constant" else {"num_training_steps": total}
    sched = fn(opt, num_warmup_steps=warmup, **args, **kw)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(lrs)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedule_matches_transformers(kind, warmup):
    total = 17
    schedule = make_schedule(_cfg(lr_scheduler=kind, warmup_steps=warmup), total)
    ours = np.array([float(schedule(s)) for s in range(total)])
    np.testing.assert_allclose(ours, _hf_lrs(kind, total, warmup), rtol=1e-5, atol=1e-9)


def test_cosine_min_lr_ratio_and_warmup_ratio():
    total = 20
    cfg = _cfg(warmup_ratio=0.1, cosine_min_lr_ratio=0.1)
    ours = np.array([float(make_schedule(cfg, total)(s)) for s in range(total)])
    np.testing.assert_allclose(ours, _hf_lrs("cosine_min", total, 2, min_lr_rate=0.1), rtol=1e-5, atol=1e-9)


def test_adamw_step_matches_torch_with_decay_mask_and_clipping():
    """Two AdamW steps with weight decay (not on bias/norm) and clipping equal torch.optim.AdamW."""
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))},
              "final_norm": {"scale": rng.normal(size=(4,))}}
    grads = [jax_tree_random(params, rng, scale=3.0) for _ in range(2)]
    cfg = _cfg(lr_scheduler="constant", weight_decay=0.1, max_grad_norm=1.0)
    tx, _ = make_optimizer(cfg, 10)
    p = {k: {n: jnp.asarray(v, jnp.float32) for n, v in d.items()} for k, d in params.items()}
    state = tx.init(p)
    import optax

    for g in grads:
        gj = {k: {n: jnp.asarray(v, jnp.float32) for n, v in d.items()} for k, d in g.items()}
        upd, state = tx.update(gj, state, p)
        p = optax.apply_updates(p, upd)

    tp = {
        (k, n): torch.nn.Parameter(torch.tensor(v, dtype=torch.float64))
        for k, d in params.items()
        for n, v in d.items()
    }
    decay = [t for (k, n), t in tp.items() if n == "kernel"]
    no_decay = [t for (k, n), t in tp.items() if n != "kernel"]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    for g in grads:
        for (k, n), t in tp.items():
            t.grad = torch.tensor(g[k][n], dtype=torch.float64)
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)
        opt.step()
    for (k, n), t in tp.items():
        np.testing.assert_allclose(np.asarray(p[k][n]), t.detach().numpy(), rtol=1e-5, atol=1e-6)


def jax_tree_random(params, rng, scale):
    return {k: {n: rng.normal(size=np.shape(v)) * scale for n, v in d.items()} for k, d in params.items()}
