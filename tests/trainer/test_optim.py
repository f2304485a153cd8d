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


def _lion_reference(lr, b1, b2, wd):
    """Lion (Chen et al. 2023, Algorithm 2; bitsandbytes' Lion) in float64, as a torch optimizer."""

    class Lion(torch.optim.Optimizer):
        def __init__(self, groups):
            super().__init__(groups, dict(lr=lr, weight_decay=wd))

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                for p in group["params"]:
                    m = self.state[p].setdefault("m", torch.zeros_like(p))
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(torch.sign(b1 * m + (1 - b1) * p.grad), alpha=-group["lr"])
                    m.mul_(b2).add_(p.grad, alpha=1 - b2)

    return Lion


def _torch_optimizer(name: str, groups: list, lr: float):
    """The PyTorch optimizer the Hugging Face Trainer builds for ``optim: name`` (what axolotl runs)."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if name == "lion":
        return _lion_reference(lr, 0.9, 0.999, 0.0)(groups)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["adamw", "adam", "adafactor", "lion", "sgd"])
def test_optimizer_steps_match_torch_with_decay_mask_and_clipping(name):
    """Three steps with weight decay (not on bias/norm) and clipping equal the PyTorch optimizer the HF
    Trainer builds for that name (Lion: the paper's algorithm); the kernel is large enough (>= 128 x 128)
    for Adafactor to factor its second moment."""
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": rng.normal(size=(130, 128)) * 0.05, "bias": rng.normal(size=(128,))},
              "final_norm": {"scale": rng.normal(size=(128,))}}
    grads = [jax_tree_random(params, rng, scale=3.0) for _ in range(3)]
    lr, wd = 1e-2, 0.1
    cfg = _cfg(lr_scheduler="constant", learning_rate=lr, weight_decay=wd, max_grad_norm=1.0, optimizer=name)
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
    opt = _torch_optimizer(name, [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}], lr)
    moved = []
    for g in grads:
        for (k, n), t in tp.items():
            t.grad = torch.tensor(g[k][n], dtype=torch.float64)
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)
        opt.step()
    for (k, n), t in tp.items():
        np.testing.assert_allclose(np.asarray(p[k][n]), t.detach().numpy(), rtol=1e-4, atol=1e-6)
        moved.append(np.abs(t.detach().numpy() - params[k][n]).max())
    assert min(moved) > 1e-4  # every parameter moved: the comparison is not of two no-ops


def test_adam_weight_decay_is_an_l2_term_not_dropped():
    """optimizer: adam with weight_decay differs from weight_decay 0 (it used to be dropped) and from adamw."""
    p = {"w": {"kernel": jnp.ones((4, 4))}}
    g = {"w": {"kernel": jnp.zeros((4, 4))}}  # Adam's first step is -lr * sign(g + wd * p)
    out = {}
    for name, wd in (("adam", 0.0), ("adam", 0.1), ("adamw", 0.1)):
        tx, _ = make_optimizer(_cfg(lr_scheduler="constant", optimizer=name, weight_decay=wd), 10)
        upd, _ = tx.update(g, tx.init(p), p)
        out[name, wd] = float(upd["w"]["kernel"][0, 0])
    assert len(set(out.values())) == 3, out


def test_warmup_longer_than_the_run_is_cut_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="jaxpref.optim"):
        schedule = make_schedule(_cfg(lr_scheduler="constant", warmup_steps=50), 10)
    assert "warmup_steps=50 is longer than the run's 10 optimizer steps" in caplog.text
    assert float(schedule(9)) == pytest.approx(1e-3) and float(schedule(0)) == 0.0


def jax_tree_random(params, rng, scale):
    return {k: {n: rng.normal(size=np.shape(v)) * scale for n, v in d.items()} for k, d in params.items()}
