"""Per-backend block sizes for ``linear_logsumexp_gather``.

``block_n`` rows and ``block_v`` vocabulary columns are processed at a time; ``block_h`` (Pallas only)
is the slice of the hidden dimension per matmul step. Values are starting points measured on the
machines named in docs/kernels.md; callers override any of them per call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. ``block_h`` is ignored by the XLA implementation."""

    block_n: int
    block_v: int
    block_h: int = 64


# (backend, implementation) -> defaults.
# xla_chunked on CPU: one big row chunk keeps each weight block read once per pass, and a wide vocabulary
#   block keeps the per-block matmul efficient; [block_n, block_v] float32 is the largest temporary.
# pallas_gpu: Triton tiles; powers of two (Triton block shapes), sized for ~100 KB of shared memory.
# pallas_tpu: (8, 128)-aligned tiles holding the whole hidden dimension; sized to stay within the default
#   16 MiB scoped VMEM at H = 4096 in bfloat16 (double-buffered h, W and grad tiles).
# pallas_* on CPU: interpret mode (tests only), small tiles so the interpreter stays quick.
_TABLE: dict[tuple[str, str], BlockSizes] = {
    ("cpu", "xla_chunked"): BlockSizes(block_n=4096, block_v=2048),
    # xla_onepass: rows per chunk (block_v unused); onepass.chunk_rows caps [rows, V] float32 by bytes.
    ("cpu", "xla_onepass"): BlockSizes(block_n=1024, block_v=0),
    ("gpu", "xla_onepass"): BlockSizes(block_n=4096, block_v=0),
    ("tpu", "xla_onepass"): BlockSizes(block_n=4096, block_v=0),
    ("gpu", "xla_chunked"): BlockSizes(block_n=8192, block_v=8192),
    ("tpu", "xla_chunked"): BlockSizes(block_n=8192, block_v=8192),
    ("gpu", "pallas_gpu"): BlockSizes(block_n=64, block_v=128, block_h=64),
    ("cpu", "pallas_gpu"): BlockSizes(block_n=16, block_v=32, block_h=16),
    ("tpu", "pallas_tpu"): BlockSizes(block_n=128, block_v=256),
    ("cpu", "pallas_tpu"): BlockSizes(block_n=16, block_v=128),
}

_FALLBACK = BlockSizes(block_n=4096, block_v=4096, block_h=64)


def default_block_sizes(backend: str, impl: str) -> BlockSizes:
    """Table entry for ``(backend, impl)``; a generic default when the pair is not listed."""
    return _TABLE.get((backend, impl), _FALLBACK)


def resolve_block_sizes(
    backend: str,
    impl: str,
    *,
    block_n: int | None = None,
    block_v: int | None = None,
    block_h: int | None = None,
) -> BlockSizes:
    """Table defaults with any explicit override applied; every size must be positive."""
    sizes = default_block_sizes(backend, impl)
    overrides = {k: v for k, v in (("block_n", block_n), ("block_v", block_v), ("block_h", block_h)) if v}
    for name, value in (("block_n", block_n), ("block_v", block_v), ("block_h", block_h)):
        if value is not None and int(value) <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    return replace(sizes, **{k: int(v) for k, v in overrides.items()})
