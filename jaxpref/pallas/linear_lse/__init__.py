"""Fused LM-head primitive: log-sum-exp over the vocabulary and logits at a few ids, without [N, V].

``api.linear_logsumexp_gather`` dispatches to ``reference`` (full logits, tests), ``xla`` (chunked, the
default on CPU), ``pallas_gpu`` (Triton kernels) and ``pallas_tpu`` (Mosaic kernels); ``blocks`` holds
the per-backend tile table. ``api.linear_logsumexp_gather_loss`` adds a row-separable loss on top, with
a one-pass value-and-gradient version (``onepass``, the CPU default); ``softcap`` is the optional
final logit soft-capping every version applies per tile. docs/kernels.md describes the design.
"""

from .api import (
    IMPLS,
    linear_logsumexp_gather,
    linear_logsumexp_gather_loss,
    linear_mean_logit,
    linear_softmax_entropy,
)
from .blocks import BlockSizes, default_block_sizes, resolve_block_sizes
from .pallas_gpu import PallasUnsupportedError
from .softcap import check_softcap, soft_cap

__all__ = [
    "IMPLS",
    "BlockSizes",
    "PallasUnsupportedError",
    "check_softcap",
    "default_block_sizes",
    "linear_logsumexp_gather",
    "linear_logsumexp_gather_loss",
    "linear_mean_logit",
    "linear_softmax_entropy",
    "resolve_block_sizes",
    "soft_cap",
]
