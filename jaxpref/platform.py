"""Which platform kernels are chosen for, and the mesh that kernels must be mapped over.

Kernels pick their implementation per platform ("cpu", "gpu", "tpu"): Pallas Mosaic and splash
attention on TPU, Pallas Triton and cuDNN attention on GPU, XLA versions on CPU. Normally that is the
platform of the default backend. ``lowering_for(platform)`` makes it the platform a step is being
lowered for (``jax.export`` on a machine without that hardware): kernels then choose as on that
platform, never run in interpret mode, and raise ``KernelLoweringError`` instead of falling back.

Pallas kernels (``pallas_call``) cannot be partitioned by XLA's SPMD partitioner, so on a mesh of more
than one device they run under ``jax.shard_map``: ``kernel_mesh(mesh)`` names the mesh while a step is
traced and ``mesh_for_kernels()`` returns it (or the ambient ``jax.set_mesh`` mesh).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import jax

from jaxpref.errors import UserError

PLATFORMS = ("cpu", "gpu", "tpu")
# --lower_for names: jax.export's platform names ("cuda") and ours ("gpu") both work.
EXPORT_PLATFORMS = {"tpu": "tpu", "cuda": "gpu", "gpu": "gpu", "cpu": "cpu"}
# cuDNN version assumed when lowering cuDNN attention without a GPU: the CPU-only jaxlib cannot ask
# the library, and jax checks the version at trace time. 9.10 is what jax 0.11's CUDA 12/13 wheels need.
CUDNN_VERSION_FOR_LOWERING = 91000

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("jaxpref_lowering_target", default=None)
_MESH: contextvars.ContextVar[Any] = contextvars.ContextVar("jaxpref_kernel_mesh", default=None)


class KernelLoweringError(UserError):
    """A kernel cannot be lowered for the platform a step is lowered for."""

    def __init__(self, kernel: str, platform: str, why: str):
        super().__init__(
            f"the {kernel} kernel cannot be lowered for {platform}: {why}. Choose another implementation "
            "(attention_impl / fused_kernel.impl) or fix the shapes named above."
        )


def backend_platform() -> str:
    """'cpu', 'gpu' or 'tpu' for the default backend (cuda/rocm count as gpu)."""
    platform = jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def kernel_platform() -> str:
    """The platform kernels are chosen for: the lowering target, else the default backend's."""
    return _TARGET.get() or backend_platform()


def lowering_target() -> str | None:
    """The platform a step is being lowered for (``lowering_for``), or None when running."""
    return _TARGET.get()


def interpret_kernels() -> bool:
    """Whether Pallas kernels run in interpret mode: only when they run on a CPU (tests)."""
    return _TARGET.get() is None and backend_platform() == "cpu"


@contextlib.contextmanager
def lowering_for(platform: str) -> Iterator[None]:
    """Choose kernels for ``platform`` ("tpu", "gpu"/"cuda", "cpu") while tracing a step to export."""
    if platform not in EXPORT_PLATFORMS:
        raise ValueError(f"platform {platform!r}: use one of {sorted(EXPORT_PLATFORMS)}")
    token = _TARGET.set(EXPORT_PLATFORMS[platform])
    try:
        with _cudnn_version_for_lowering() if EXPORT_PLATFORMS[platform] == "gpu" else contextlib.nullcontext():
            yield
    finally:
        _TARGET.reset(token)


@contextlib.contextmanager
def _cudnn_version_for_lowering() -> Iterator[None]:
    """Let jax trace cuDNN attention on a jaxlib without CUDA (it asks cuDNN for its version first)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    if cudnn_attention.cuda_versions is not None:  # a CUDA jaxlib answers for itself
        yield
        return
    original = cudnn_attention.check_cudnn_version
    cudnn_attention.check_cudnn_version = lambda: CUDNN_VERSION_FOR_LOWERING
    try:
        yield
    finally:
        cudnn_attention.check_cudnn_version = original


# GPU custom-call targets jax.export refuses by default (no compatibility guarantee across jaxlib
# versions): Pallas Triton kernels and cuDNN attention. The exported module is a check of what the step
# compiles to on this jaxlib, not an artifact to keep, so they are allowed, as jax's docs suggest.
TRITON_TARGET = "__gpu$xla.gpu.triton"
CUDNN_ATTENTION_TARGETS = tuple(
    f"__cudnn$fmha{kind}{suffix}"
    for kind in ("Softmax", "ScaleBiasSoftmax", "SoftmaxDropout", "ScaleBiasSoftmaxDropout")
    for suffix in ("", "Backward")
)


def export_safety_exemptions(target: str) -> list[Any]:
    """``disabled_checks`` for ``jax.export.export`` of a training step for ``target``."""
    if EXPORT_PLATFORMS.get(target) != "gpu":
        return []
    return [jax.export.DisabledSafetyCheck.custom_call(t) for t in (TRITON_TARGET, *CUDNN_ATTENTION_TARGETS)]


@contextlib.contextmanager
def kernel_mesh(mesh: Any) -> Iterator[None]:
    """Name the mesh a step is traced for, so Pallas kernels inside can map themselves over it."""
    token = _MESH.set(mesh)
    try:
        yield
    finally:
        _MESH.reset(token)


def mesh_for_kernels() -> Any:
    """The mesh kernels must be mapped over: ``kernel_mesh``'s, else ``jax.set_mesh``'s; None for one
    device (or no mesh)."""
    mesh = _MESH.get()
    if mesh is None:
        ambient = jax.sharding.get_abstract_mesh()
        mesh = None if ambient.empty else ambient
    if mesh is None or mesh.size <= 1:
        return None
    return mesh


def dividing_axes(mesh: Any, axes: tuple[str, ...], size: int) -> tuple[str, ...]:
    """The longest prefix of ``axes`` (those of ``mesh`` larger than 1) whose sizes multiply to a divisor
    of ``size``: the axes a kernel can split a dimension of ``size`` over."""
    picked = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
    while picked and size % math.prod(mesh.shape[a] for a in picked):
        picked = picked[:-1]
    return picked


def spec_entry(axes: tuple[str, ...]) -> Any:
    """A PartitionSpec entry for ``axes``: None, one name, or a tuple of names."""
    return None if not axes else axes[0] if len(axes) == 1 else axes
