"""The GRPO objective end to end against TRL 1.16's ``GRPOTrainer._compute_loss`` on the same weights.

A tiny random transformers Llama is saved and loaded by both sides. TRL gets its usual inputs (left-padded
prompts, right-padded completions, a completion masked as truncated, advantages, old and reference
per-token log-probs that TRL's own ``_get_per_token_logps_and_entropies`` computes) and runs its loss
and backward pass; jaxpref gets the same rows as a GRPO micro-batch (prompt + completion per row,
prediction-aligned) and runs ``objective.loss`` under ``jax.value_and_grad``. Compared: the loss, the
gradients of the LM head, the final norm and the embedding (which every layer's gradient reaches),
TRL's logged metrics (``entropy`` included: jaxpref's blocked entropy pass at the sampling temperature),
and ``token_logps`` (the rollout's old log-probs) against TRL's per-token log-probs. Then: the
reference modes, and exact gradient accumulation through ``jaxpref.trainer.Trainer`` per loss type.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpref import lora, models
from jaxpref.objectives import build_objective
from jaxpref.objectives.grpo import token_logps
from jaxpref.sharding import make_mesh
from jaxpref.trainer import Trainer
from tests.objectives.helpers import hf_llama, tokenizer

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

TOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-6
TEMPERATURE = 0.7
MAX_COMPLETION = 8


def trl_section(**kw) -> SimpleNamespace:
    """The ``trl`` section's fields the objective reads (TrlConfig's defaults, TRL's)."""
    base = dict(
        temperature=1.0, beta=0.0, epsilon=0.2, epsilon_high=None, delta=None, loss_type="dapo",
        importance_sampling_level="token", num_iterations=1, use_bias_correction_kl=True,
        max_completion_length=MAX_COMPLETION,
    )  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def grpo_cfg(adapter=None, rl_adapter_ref_model=False, **trl_kw) -> SimpleNamespace:
    """A stand-in config with only what the GRPO builder may read."""
    return SimpleNamespace(
        trl=trl_section(**trl_kw), adapter=adapter, rl_adapter_ref_model=rl_adapter_ref_model, fused_kernel=None
    )


# ---------------------------------------------------------------------------------------------------------
# Rows: prompts and completions as token ids, in TRL's layout and in jaxpref's.

PROMPTS = [[5, 17, 99, 240, 31], [7, 8, 9], [300, 301, 302, 303, 304, 305], [11, 12, 13, 14]]
COMPLETIONS = [[44, 45, 46, 47, 48, 2], [61, 2], [70, 71, 72, 73], [80, 81, 82, 83, 84]]
TRUNCATED_MASKED = 3  # a completion cut at max length and masked (TRL's mask_truncated_completions)
ADVANTAGES = np.array([1.2, -0.8, 0.5, 0.9], np.float32)


def trl_rows(pad_id: int) -> dict:
    p_len, c_len = max(map(len, PROMPTS)), max(map(len, COMPLETIONS))
    prompt_ids = torch.tensor([[pad_id] * (p_len - len(p)) + p for p in PROMPTS])
    prompt_mask = torch.tensor([[0] * (p_len - len(p)) + [1] * len(p) for p in PROMPTS])
    completion_ids = torch.tensor([c + [pad_id] * (c_len - len(c)) for c in COMPLETIONS])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (c_len - len(c)) for c in COMPLETIONS])
    completion_mask[TRUNCATED_MASKED] = 0
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask)  # fmt: skip


def completion_to_row(values: np.ndarray, t_len: int) -> np.ndarray:
    """TRL's [B, C] per-completion-token values -> jaxpref's prediction-aligned [B, T]: completion token
    j of row i sits at position len(prompt_i) + j and is predicted at the position before."""
    out = np.zeros((len(PROMPTS), t_len), np.float32)
    for i, p in enumerate(PROMPTS):
        n = len(COMPLETIONS[i])
        out[i, len(p) - 1 : len(p) - 1 + n] = values[i, :n]
    return out


def jaxpref_batch(advantages: np.ndarray, old_logps_c: np.ndarray | None = None, *, extra_rows: int = 0) -> dict:
    """The same rows as a GRPO micro-batch (+ ``extra_rows`` all-zero padding rows)."""
    t_len = max(len(p) + len(c) for p, c in zip(PROMPTS, COMPLETIONS)) + 1
    b = len(PROMPTS) + extra_rows
    batch = {k: np.zeros((b, t_len), np.int32) for k in ("input_ids", "labels", "positions", "segment_ids")}
    batch["loss_mask"] = np.zeros((b, t_len), bool)
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        ids = p + c
        batch["input_ids"][i, : len(ids)] = ids
        batch["labels"][i, : len(ids) - 1] = ids[1:]
        batch["positions"][i, : len(ids)] = np.arange(len(ids))
        batch["segment_ids"][i, : len(ids)] = 1
        if i != TRUNCATED_MASKED:
            batch["loss_mask"][i, len(p) - 1 : len(ids) - 1] = True
    batch["advantages"] = np.zeros(b, np.float32)
    batch["advantages"][: len(PROMPTS)] = advantages
    batch["old_logps"] = np.zeros((b, t_len), np.float32)
    if old_logps_c is not None:
        batch["old_logps"][: len(PROMPTS)] = completion_to_row(old_logps_c, t_len)
    return batch


# ---------------------------------------------------------------------------------------------------------
# The two sides.


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(policy dir, torch reference, jaxpref policy, jaxpref reference): a reference with other weights,
    so that the KL term is not zero."""
    root = tmp_path_factory.mktemp("grpo_weights")
    policy, reference = hf_llama(seed=0), hf_llama(seed=1)
    policy.save_pretrained(root / "policy")
    reference.save_pretrained(root / "reference")
    return (
        str(root / "policy"), reference,
        models.from_pretrained(str(root / "policy")), models.from_pretrained(str(root / "reference")),
    )  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def trl_step(tmp_path, weights, tok, case: dict, *, old_noise: float):
    """TRL's loss, gradients, metrics and per-token log-probs ([B, C]) for ``case`` (GRPOConfig keys)."""
    policy_dir, reference, _, _ = weights

    def reward(completions, **kw):
        return [0.0] * len(completions)

    args = trl.GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16=False, per_device_train_batch_size=4,
        num_generations=2, max_completion_length=MAX_COMPLETION, temperature=TEMPERATURE, **case,
    )  # fmt: skip
    ds = datasets.Dataset.from_list([{"prompt": "hi"}] * 4)
    trainer = trl.GRPOTrainer(
        model=policy_dir, reward_funcs=[reward], args=args, train_dataset=ds, processing_class=tok
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by HF's training loop
    rows = trl_rows(tok.pad_token_id)
    ids = torch.cat([rows["prompt_ids"], rows["completion_ids"]], 1)
    attention = torch.cat([rows["prompt_mask"], rows["completion_mask"]], 1)
    keep = rows["completion_ids"].size(1)
    with torch.no_grad():  # what _generate_and_score_completions computes, with TRL's own method
        policy_logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, keep)
        inputs = dict(rows, advantages=torch.tensor(ADVANTAGES))
        inputs["num_items_in_batch"] = rows["completion_mask"].sum()
        if trainer.beta != 0.0:
            trainer.ref_model.load_state_dict(reference.state_dict())  # TRL's (fused-head) reference, other weights
            inputs["ref_per_token_logps"], _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.ref_model, ids, attention, keep
            )
    old = None
    if old_noise:
        rng = np.random.default_rng(0)
        old = (policy_logps.numpy() + rng.normal(0.0, old_noise, policy_logps.shape)).astype(np.float32)
        inputs["old_per_token_logps"] = torch.tensor(old)
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    m = trainer.model
    grads = {
        "lm_head": m.lm_head.weight.grad.numpy().T,
        "norm": m.model.norm.weight.grad.numpy(),
        "embed": m.model.embed_tokens.weight.grad.numpy(),
    }
    metrics = {k: float(v[-1]) for k, v in trainer._metrics["train"].items()}
    return float(loss.detach()), grads, metrics, policy_logps.numpy(), old


def jax_step(objective, model, batch, companions=None):
    """jaxpref's (loss, metrics, grads) of one micro-batch, ``num_items`` = its own count."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    others = {k: nnx.split(c) for k, c in (companions or {}).items()}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    @jax.jit
    def run(params, rest, other_states, batch):
        def f(params):
            kw = {}
            if objective.companions:
                kw["companions"] = {k: nnx.merge(others[k][0], s) for k, s in other_states.items()}
            return objective.loss(nnx.merge(graphdef, params, rest), batch, objective.count(batch), train=True, **kw)

        return jax.value_and_grad(f, has_aux=True)(params)

    (loss, metrics), grads = run(params, rest, {k: s for k, (_, s) in others.items()}, batch)
    g = nnx.to_pure_dict(grads)
    return (
        float(loss),
        {k: float(v) for k, v in metrics.items()},
        {
            "lm_head": np.asarray(g["lm_head"]["kernel"]),
            "norm": np.asarray(g["norm"]["scale"]),
            "embed": np.asarray(g["embed_tokens"]["embedding"]),
        },
    )


CASES = {
    # DAPO (TRL's default loss) with the KL to a frozen reference, clip-higher, reused completions
    "dapo-kl-iterations": dict(loss_type="dapo", beta=0.04, epsilon_high=0.28, num_iterations=2),
    # GSPO: sequence-level ratios, two-sided clipping, no KL
    "gspo-delta": dict(loss_type="grpo", importance_sampling_level="sequence", delta=1.5, num_iterations=2),
    # Dr. GRPO on fresh completions (ratio 1) with the KL
    "dr_grpo-kl-fresh": dict(loss_type="dr_grpo", beta=0.04),
}


@pytest.mark.parametrize("name", list(CASES))
def test_grpo_step_equals_trl(tmp_path, weights, tok, name):
    case = CASES[name]
    _, _, policy, reference = weights
    iterations = case.get("num_iterations", 1)
    want_loss, want_grads, want, policy_logps_c, old_c = trl_step(
        tmp_path, weights, tok, case, old_noise=0.3 if iterations > 1 else 0.0
    )

    cfg = grpo_cfg(temperature=TEMPERATURE, **case)
    objective = build_objective(cfg, "grpo")
    assert objective.reference == ("model" if case.get("beta") else "none")
    batch = jaxpref_batch(ADVANTAGES, old_c, extra_rows=1)  # and a padding row, which changes nothing
    companions = {"reference": reference} if objective.companions else None
    loss, got, grads = jax_step(objective, policy, batch, companions)

    np.testing.assert_allclose(loss, want_loss, rtol=TOL, atol=TOL)
    keys = ["entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
            "clip_ratio/low_min", "clip_ratio/high_max"] + (["kl"] if case.get("beta") else [])  # fmt: skip
    assert sorted(got) == sorted(keys)
    for k in keys:
        np.testing.assert_allclose(got[k], want[k], rtol=TOL, atol=TOL, err_msg=k)
    for k in grads:
        np.testing.assert_allclose(grads[k], want_grads[k], rtol=GRAD_RTOL, atol=GRAD_ATOL, err_msg=k)
        assert np.abs(want_grads[k]).max() > 1e-3, k
    if iterations > 1:
        assert want["clip_ratio/region_mean"] > 0  # the clipping is live
    if case.get("beta"):
        assert want["kl"] > 1e-2

    # The rollout's old log-probs: token_logps equals TRL's per-token log-probs at the temperature.
    t_len = batch["input_ids"].shape[1]
    ours = jax.jit(lambda b: token_logps(policy, b, temperature=TEMPERATURE))(
        {k: jnp.asarray(v) for k, v in batch.items()}
    )
    want_logps = completion_to_row(policy_logps_c, t_len) * batch["loss_mask"][:4]
    np.testing.assert_allclose(np.asarray(ours)[:4], want_logps, rtol=TOL, atol=TOL)
    np.testing.assert_array_equal(np.asarray(ours)[4], 0.0)


# ---------------------------------------------------------------------------------------------------------
# Reference modes and the builder's inputs.


def test_reference_modes():
    assert build_objective(grpo_cfg(), "grpo").reference == "none"
    assert build_objective(grpo_cfg(adapter="lora", beta=0.1), "grpo").reference == "adapter_off"
    o = build_objective(grpo_cfg(adapter="lora", rl_adapter_ref_model=True, beta=0.1), "grpo")
    assert o.reference == "model" and o.companions == ("reference",)
    o = build_objective(grpo_cfg(beta=0.1), "grpo")
    assert o.reference == "model" and o.companions == ("reference",)
    assert o.data == "prompts" and o.batch_keys[-2:] == ("advantages", "old_logps")


def test_builds_from_a_validated_config():
    from tests.data.helpers import config

    cfg = config(rl="grpo", micro_batch_size=4, trl={"reward_funcs": ["m.f"], "num_generations": 4, "beta": 0.0})
    objective = build_objective(cfg, "grpo")
    assert objective.name == "grpo" and objective.reference == "none" and objective.companions == ()


TINY = dict(
    model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
)  # fmt: skip


def tiny_model(seed=0):
    return models.from_config(models.ModelConfig.from_hf_dict(TINY), seed=seed)


def random_rows(n: int, seed: int, t_len: int = 12) -> list[dict]:
    """``n`` one-row GRPO micro-batches: prompt of 2-4 tokens, completion of 0-7, random old log-probs."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        p, c = int(rng.integers(2, 5)), int(rng.integers(0, 8))
        ids = np.zeros((1, t_len), np.int32)
        ids[0, : p + c] = rng.integers(1, 64, p + c)
        labels = np.zeros_like(ids)
        labels[0, :-1] = ids[0, 1:]
        seg = (np.arange(t_len) < p + c).astype(np.int32)[None]
        mask = ((np.arange(t_len) >= p - 1) & (np.arange(t_len) < p + c - 1))[None]
        rows.append({
            "input_ids": ids, "labels": labels, "loss_mask": mask, "segment_ids": seg,
            "positions": (np.arange(t_len) * seg[0]).astype(np.int32)[None],
            "advantages": rng.normal(size=1).astype(np.float32),
            "old_logps": np.where(mask, -rng.gamma(2.0, 1.0, (1, t_len)), 0.0).astype(np.float32),
        })  # fmt: skip
    return rows


def concat(rows: list[dict]) -> dict:
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def test_adapter_off_reference_is_the_base_model():
    """LoRA with ``rl_adapter_ref_model`` false: the reference is the policy with its adapters off;
    the ``kl`` metric is TRL's k3 estimate between adapters on and off."""
    model = tiny_model()
    lora.apply_lora(model, lora.LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj")),
                    rngs=nnx.Rngs(1))  # fmt: skip
    for lin in (model.layers.self_attn.q_proj, model.layers.self_attn.v_proj):
        lin.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(2), lin.lora_b[...].shape)
    cfg = grpo_cfg(adapter="lora", beta=0.04, use_bias_correction_kl=False)
    objective = build_objective(cfg, "grpo")
    assert objective.reference == "adapter_off" and objective.companions == ()
    batch = {k: jnp.asarray(v) for k, v in concat(random_rows(4, seed=3)).items()}
    _, metrics = objective.loss(model, batch, objective.count(batch), train=False)
    on = token_logps(model, batch, temperature=1.0)
    off = token_logps(model, batch, temperature=1.0, use_adapters=False)
    d = off - on
    mask = batch["loss_mask"]
    kl = float(jnp.sum(jnp.where(mask, jnp.exp(d) - d - 1, 0.0)) / jnp.sum(mask))
    np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=1e-5)
    assert kl > 1e-4


# ---------------------------------------------------------------------------------------------------------
# Gradient accumulation through the Trainer.


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_accumulation_2x3_equals_1x6(loss_type):
    """Two micro-batches of 3 rows (unequal token counts) and one of 6: the same loss, gradient norm
    and SGD update (SGD, so that a wrong normaliser would change the update). Token-mean metrics are
    equal for the token-normalised losses; for grpo/dr_grpo they are the mean of the micro-batch means
    (TRL's logging), checked in tests/losses/test_grpo_trl_parity.py."""
    objective = build_objective(
        grpo_cfg(loss_type=loss_type, num_iterations=2, importance_sampling_level="token"), "grpo"
    )
    rows = random_rows(6, seed=11)
    two = [concat(rows[:3]), concat(rows[3:])]
    assert two[0]["loss_mask"].sum() != two[1]["loss_mask"].sum()
    stats = []
    trainers = []
    for micro_batches in (two, [concat(rows)]):
        trainer = Trainer(tiny_model(), objective, optax.sgd(0.5), mesh=make_mesh(None))
        stats.append(trainer.train_step(micro_batches))
        trainers.append(trainer)
    a, b = stats
    for key in ("loss", "grad_norm", "num_items"):
        np.testing.assert_allclose(a[key], b[key], rtol=2e-5, err_msg=key)
    if loss_type in ("bnpo", "dapo"):
        for key in ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            np.testing.assert_allclose(a[key], b[key], rtol=2e-5, atol=1e-7, err_msg=key)
    assert a["clip_ratio/region_mean"] > 0 and a["grad_norm"] > 1e-3
    before = jax.tree.leaves(nnx.state(tiny_model(), nnx.Param))
    leaves_a, leaves_b = (jax.tree.leaves(t.params) for t in trainers)
    assert max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(leaves_a, before)) > 1e-4  # it moved
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-6)
