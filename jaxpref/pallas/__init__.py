"""Custom kernels, one folder per kernel (api dispatcher, reference, XLA and Pallas versions, block table).

Imports nothing from the rest of jaxpref.
"""

from .linear_lse import IMPLS, BlockSizes, PallasUnsupportedError, linear_logsumexp_gather, linear_logsumexp_gather_loss

__all__ = [
    "IMPLS",
    "BlockSizes",
    "PallasUnsupportedError",
    "linear_logsumexp_gather",
    "linear_logsumexp_gather_loss",
]
