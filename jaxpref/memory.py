"""Per-device memory estimates for ``python -m jaxpref.train --dry_run`` (no weights, no data).

Parameter, optimizer and gradient bytes are exact shard sizes: the model and the optimizer state are
built with ``jax.eval_shape`` (shapes only) and every array is split by the logical-axis rules over
the configured mesh (:func:`jaxpref.sharding.per_device_bytes`). Activations are an estimate from
the shapes, per device and per micro-batch (gradient accumulation runs micro-batches one after
another, so it does not add):

    rows   = micro_batch_size x processes / (data x fsdp)      (x2 for preference pairs: chosen and
                                                                 rejected go through one forward pass)
    tokens = rows x sequence_len
    per token and layer, in compute-dtype elements (Q = heads x head_dim / tensor, KV likewise with
    kv_heads, I = intermediate_size / tensor, H = hidden_size):
      none                     4H + 3Q + 3KV + 4I   (layer input, 2 norms, attention output, q/k/v
                                                     before and after RoPE, gate, up, silu, product)
                               + 2H for Gemma's 2 extra norms (post-attention, post-feedforward)
      dots                     2H + 2Q + 2KV + 2I   (every matmul output is kept)
      dots_with_no_batch_dims  2H +  Q + 2KV + 2I   (projection outputs; attention is recomputed)
      full                      H                   (only the layer input; the layer is recomputed)
    plus, for XLA attention (CPU, TPU, GPU without cuDNN flash attention), per token and layer
    P = heads / tensor x sequence_len float32 values of attention probabilities: ``none`` keeps
    2P (scores and probabilities), ``dots`` keeps the scores (P in the compute dtype), the others
    recompute them. Phi-3's fused ``qkv_proj`` is not split over ``tensor`` (its q/k/v boundaries do
    not fall on shard boundaries), so there Q and KV are not divided by ``tensor``;
    with a remat policy the layer being recomputed holds what was not kept again: the ``none``
    set minus the kept set, plus P.

    activations = tokens x (layers x kept + recomputed + H) in bytes

The final ``+ H`` is the last hidden state the fused LM-head loss reads. The loss itself works in
row blocks and never holds [tokens, vocab] logits; its working set (``loss_bytes``) is the float32
hidden states and their gradient, plus three float32 [rows, block_v] blocks of the XLA chunked
version (logits, their exponentials, their gradient; the Pallas kernels keep their tiles on chip):

    loss = tokens x H x 8 + 3 x min(tokens, block_n) x min(block_v, V) x 4   (block_n 4096, block_v 2048)

XLA's own temporaries (fusion buffers, collective buffers) come on top; leave 10-20 % headroom, or
compile the step on the machine (``--dry_run_compile``) for XLA's exact figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")


@dataclass(frozen=True)
class ActivationEstimate:
    """Activation bytes per device for one micro-batch, with the numbers that went into it."""

    rows_per_device: float
    tokens_per_device: float
    elements_per_token_layer: float  # compute-dtype elements kept per token and layer
    attention_bytes_per_token_layer: float  # attention scores/probabilities kept (XLA attention)
    recompute_bytes_per_token: float  # one layer's full set while it is recomputed (remat only)
    bytes: int


def activation_bytes(
    *,
    rows_per_device: float,
    sequence_len: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    tensor: int,
    remat_policy: str,
    compute_bytes: int,
    xla_attention: bool = True,
    extra_norms: int = 0,
    split_qkv: bool = True,
) -> ActivationEstimate:
    """The module docstring's formula. ``tensor`` divides the head and MLP dimensions (when it can;
    q/k/v only with ``split_qkv``); ``extra_norms`` norm outputs [H] per layer beyond the two."""
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy {remat_policy!r} is not one of {REMAT_POLICIES}")

    def split(n: int) -> float:
        return n / tensor if n % tensor == 0 else float(n)

    h = float(hidden_size)
    heads = (split(num_heads), split(num_kv_heads)) if split_qkv else (float(num_heads), float(num_kv_heads))
    q, kv = heads[0] * head_dim, heads[1] * head_dim
    i = split(intermediate_size)
    none = (4 + extra_norms) * h + 3 * q + 3 * kv + 4 * i
    kept = {
        "none": none,
        "dots": 2 * h + 2 * q + 2 * kv + 2 * i,
        "dots_with_no_batch_dims": 2 * h + q + 2 * kv + 2 * i,
        "full": h,
    }[remat_policy]
    p = heads[0] * sequence_len if xla_attention else 0.0
    attention = {"none": 2 * p * 4.0, "dots": p * compute_bytes}.get(remat_policy, 0.0)
    recompute = 0.0 if remat_policy == "none" else (none - kept) * compute_bytes + p * 4.0
    tokens = rows_per_device * sequence_len
    per_token = num_layers * (kept * compute_bytes + attention) + recompute + h * compute_bytes
    return ActivationEstimate(
        rows_per_device=rows_per_device,
        tokens_per_device=tokens,
        elements_per_token_layer=kept,
        attention_bytes_per_token_layer=attention,
        recompute_bytes_per_token=recompute,
        bytes=int(tokens * per_token),
    )


def loss_bytes(
    *, tokens: float, hidden_size: int, vocab_size: int, block_n: int = 4096, block_v: int = 2048
) -> int:
    """The fused LM-head loss's working set in bytes (the module docstring's ``loss``)."""
    return int(tokens * hidden_size * 8 + 3 * min(tokens, block_n) * min(block_v, vocab_size) * 4)


def human(n: float) -> str:
    """Bytes as a short string (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def summarize(parts: dict[str, int]) -> dict[str, Any]:
    """``{name: bytes}`` plus their total, each as ``{"bytes": n, "human": "1.23 GiB"}``."""
    total = sum(parts.values())
    return {
        **{k: {"bytes": int(v), "human": human(v)} for k, v in parts.items()},
        "total": {"bytes": int(total), "human": human(total)},
    }
