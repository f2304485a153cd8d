"""Custom kernels, one folder per kernel (api dispatcher, reference, XLA and Pallas versions, block table).

Of the rest of jaxpref the kernels import only ``jaxpref.platform`` (which platform a kernel is built
for, and the mesh it is mapped over; itself built on jax and ``jaxpref.errors`` alone). ``jaxpref.losses``
depends on this package, never the reverse.
"""

from .linear_lse import (
    IMPLS,
    BlockSizes,
    PallasUnsupportedError,
    check_softcap,
    linear_logsumexp_gather,
    linear_logsumexp_gather_loss,
    linear_mean_logit,
    linear_softmax_entropy,
    soft_cap,
)

__all__ = [
    "IMPLS",
    "BlockSizes",
    "PallasUnsupportedError",
    "check_softcap",
    "linear_logsumexp_gather",
    "linear_logsumexp_gather_loss",
    "linear_mean_logit",
    "linear_softmax_entropy",
    "soft_cap",
]
