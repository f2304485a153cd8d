"""Dispatcher for ``linear_logsumexp_gather`` over its implementations."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxpref import platform

from .blocks import default_block_sizes, resolve_block_sizes
from .onepass import RowLoss, linear_logsumexp_gather_loss_onepass
from .pallas_gpu import PallasUnsupportedError, linear_logsumexp_gather_pallas_gpu
from .pallas_tpu import linear_logsumexp_gather_pallas_tpu
from .reference import linear_logsumexp_gather_reference
from .softcap import check_softcap, soft_cap
from .xla import linear_logsumexp_gather_xla, linear_mean_logit_xla, linear_softmax_entropy_xla, vocabulary_mean

IMPLS = ("auto", "reference", "xla_chunked", "xla", "xla_onepass", "pallas", "pallas_gpu", "pallas_tpu")
_PALLAS = {"pallas_gpu": linear_logsumexp_gather_pallas_gpu, "pallas_tpu": linear_logsumexp_gather_pallas_tpu}


def _backend() -> str:
    """'cpu', 'gpu' or 'tpu': the platform kernels are chosen for (``jaxpref.platform``)."""
    return platform.kernel_platform()


def linear_logsumexp_gather(
    hidden: jax.Array,
    weight: jax.Array,
    ids: jax.Array,
    *,
    bias: jax.Array | None = None,
    temperatures: Sequence[float] = (1.0,),
    softcap: float | None = None,
    impl: str = "auto",
    block_n: int | None = None,
    block_v: int | None = None,
    block_h: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Log-sum-exp over the vocabulary and logits at a few ids of ``hidden @ weight (+ bias)``.

    The [N, V] logits are never materialised (except by ``impl="reference"``); the custom VJP recomputes
    logits block by block. Math is float32 whatever the input dtypes; gradients come back in the input
    dtypes and are exact for both outputs (duplicate ids in a row accumulate).

    Args:
      hidden: [N, H] final hidden states (any float dtype).
      weight: [H, V] LM-head weight.
      ids: int [N, K'] vocabulary ids per row, e.g. teacher top-k and/or the label. They must lie in
        [0, V): callers clip or replace padding ids (e.g. -100) and mask those entries themselves.
      bias: optional [V] LM-head bias.
      temperatures: static positive floats; output row t is ``logsumexp(logits / temperatures[t])``.
      softcap: static positive float or None: final logit soft-capping (Gemma 2), ``logits = softcap *
        tanh(raw / softcap)`` with ``raw = hidden @ weight (+ bias)``, applied inside every vocabulary
        tile before the temperature; both outputs are of the capped logits and the VJP goes through
        the cap (``softcap.py``).
      impl: "auto" (Pallas on GPU/TPU, falling back to xla_chunked with a one-line warning when the
        kernel cannot compile for the shape; xla_chunked on CPU), "reference", "xla_chunked" (alias
        "xla"), "pallas_gpu" (Triton), "pallas_tpu" (Mosaic), "pallas" (the one for this backend;
        pallas_gpu on CPU). On CPU the Pallas kernels run in interpret mode (tests only).
        "xla_onepass" needs a row-separable loss (``linear_logsumexp_gather_loss``); here it means
        xla_chunked.
      block_n, block_v, block_h: tile overrides; defaults come from ``blocks.py`` per backend
        (``block_h`` is used by pallas_gpu only).

    Returns:
      (logsumexp [len(temperatures), N] float32, gathered [N, K'] float32 logits at ``ids``, capped
      when ``softcap`` is set, never divided by a temperature).
    """
    temps = _check_args(hidden, weight, ids, bias, temperatures, impl)
    cap = check_softcap(softcap)
    ids = ids.astype(jnp.int32)
    backend = _backend()
    name = _resolve(impl, backend)
    if name == "reference":
        return linear_logsumexp_gather_reference(hidden, weight, ids, bias=bias, temperatures=temps, softcap=cap)
    if name in _PALLAS:
        sizes = resolve_block_sizes(backend, name, block_n=block_n, block_v=block_v, block_h=block_h)
        opts = dict(
            temperatures=temps, softcap=cap, block_n=sizes.block_n, block_v=sizes.block_v, interpret=backend == "cpu"
        )
        if name == "pallas_gpu":
            opts["block_h"] = sizes.block_h
        kernel = functools.partial(_over_mesh, functools.partial(_PALLAS[name], **opts))
        if platform.lowering_target() is not None:
            try:
                return kernel(hidden, weight, ids, bias)
            except PallasUnsupportedError as e:
                raise platform.KernelLoweringError(f"fused LM-head ({name})", backend, str(e)) from e
        if impl != "auto":
            return kernel(hidden, weight, ids, bias)
        reason = _pallas_failure(name, _signature(hidden, weight, ids, bias), tuple(sorted(opts.items())))
        if reason is None:
            return kernel(hidden, weight, ids, bias)
        warnings.warn(
            f"jaxpref linear_logsumexp_gather: {name} kernel unavailable ({reason}); using xla_chunked",
            RuntimeWarning,
            stacklevel=2,
        )
        block_n = block_v = None  # Pallas tile overrides are not meaningful for the XLA version
    sizes = resolve_block_sizes(backend, "xla_chunked", block_n=block_n, block_v=block_v)
    return linear_logsumexp_gather_xla(
        hidden, weight, ids, bias=bias, temperatures=temps, softcap=cap, block_n=sizes.block_n,
        block_v=sizes.block_v,
    )  # fmt: skip


def linear_logsumexp_gather_loss(
    hidden: jax.Array,
    weight: jax.Array,
    ids: jax.Array,
    row_loss: RowLoss,
    row_inputs: Any,
    *,
    bias: jax.Array | None = None,
    temperatures: Sequence[float] = (1.0,),
    softcap: float | None = None,
    impl: str = "auto",
    block_n: int | None = None,
    block_v: int | None = None,
    block_h: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``row_loss(lse, gathered, row_inputs)`` for ``lse, gathered = linear_logsumexp_gather(...)``, fused.

    ``row_loss`` must be a sum of independent per-row terms (row i's term reads only ``lse[:, i]``,
    ``gathered[i]`` and row i of ``row_inputs``), e.g. an unnormalised token cross-entropy or top-k KD
    sum; the caller divides by its N. That lets "xla_onepass" finish each row chunk's value and
    gradient in one pass over the vocabulary (three LM-head matmuls instead of four; see onepass.py).
    Other implementations compute ``linear_logsumexp_gather`` and apply ``row_loss`` to it, so every
    ``impl`` gives the same value and gradients (up to float32 rounding).

    Args:
      hidden, weight, ids, bias, temperatures, softcap, block_n, block_v, block_h: as
        ``linear_logsumexp_gather``.
      row_loss: ``(lse [T, n], gathered [n, K'], row_inputs) -> float32 scalar``; a static Python
        callable (it must not close over traced values: pass those through ``row_inputs``).
      row_inputs: pytree of arrays with leading dim N (masks, targets); not differentiated.
      impl: as ``linear_logsumexp_gather``; "auto" is "xla_onepass" on CPU for a float32 weight.

    Returns:
      (value float32 scalar, lse [T, N], gathered [N, K']); only ``value`` carries gradients (lse and
      gathered are for metrics).
    """
    temps = _check_args(hidden, weight, ids, bias, temperatures, impl)
    cap = check_softcap(softcap)
    backend = _backend()
    # On CPU a 16-bit LM head goes to xla_chunked: XLA:CPU multiplies bfloat16 in float32, and with the
    # whole vocabulary per row chunk it hoists a float32 copy of the head (in both layouts: 1.2 GiB at
    # H=1024, V=152k) out of the loop; the chunked version streams vocabulary blocks instead.
    onepass_auto = backend == "cpu" and jnp.dtype(weight.dtype) == jnp.float32
    if impl == "xla_onepass" or (impl == "auto" and onepass_auto):
        sizes = resolve_block_sizes(backend, "xla_onepass", block_n=block_n)
        chunked = default_block_sizes(backend, "xla_chunked")
        return linear_logsumexp_gather_loss_onepass(
            hidden, weight, ids, row_loss, row_inputs, bias=bias, temperatures=temps, softcap=cap,
            block_n=sizes.block_n,
            forward_blocks=(chunked.block_n, chunked.block_v),
        )  # fmt: skip
    lse, gathered = linear_logsumexp_gather(
        hidden, weight, ids, bias=bias, temperatures=temps, softcap=cap, impl=impl, block_n=block_n,
        block_v=block_v, block_h=block_h,
    )  # fmt: skip
    value = row_loss(lse, gathered, row_inputs).astype(jnp.float32)
    return value, jax.lax.stop_gradient(lse), jax.lax.stop_gradient(gathered)


def linear_softmax_entropy(
    hidden: jax.Array,
    weight: jax.Array,
    *,
    bias: jax.Array | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    impl: str = "auto",
    block_n: int | None = None,
    block_v: int | None = None,
) -> jax.Array:
    """Entropy of ``softmax((hidden @ weight (+ bias)) / temperature)`` per row, without [N, V]; no gradient.

    ``H_i = logsumexp(z_i) - sum_v softmax(z_i)_v z_iv`` with ``z = logits / temperature`` (nats).
    A metric (GRPO's ``entropy``): the inputs are under ``stop_gradient``. Every ``impl`` but
    "reference" (full logits, tests) runs the blocked XLA forward (``linear_softmax_entropy_xla``) with
    the backend's ``xla_chunked`` tiles: one more forward matmul over the LM head; the Pallas kernels
    have no entropy output.

    Args:
      hidden: [N, H]; weight: [H, V]; bias: optional [V].
      temperature: static positive float.
      softcap: static positive float or None: the logits are ``softcap * tanh(logits / softcap)``
        before the temperature (as ``linear_logsumexp_gather``).
      impl, block_n, block_v: "reference", or anything else for the blocked XLA pass; tile overrides.

    Returns:
      float32 [N].
    """
    _check_args(hidden, weight, jnp.zeros((hidden.shape[0], 1), jnp.int32), bias, (temperature,), impl)
    t = float(temperature)
    cap = check_softcap(softcap)
    if impl == "reference":
        z = jnp.dot(jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(weight), preferred_element_type=jnp.float32)
        if bias is not None:
            z = z + jax.lax.stop_gradient(bias).astype(jnp.float32)
        z = soft_cap(z, cap)
        logp = jax.nn.log_softmax(z / t, axis=-1)
        return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    sizes = resolve_block_sizes(_backend(), "xla_chunked", block_n=block_n, block_v=block_v)
    return linear_softmax_entropy_xla(
        hidden, weight, bias=bias, temperature=t, softcap=cap, block_n=sizes.block_n, block_v=sizes.block_v
    )


def linear_mean_logit(
    hidden: jax.Array,
    weight: jax.Array,
    *,
    softcap: float | None = None,
    block_n: int | None = None,
    block_v: int | None = None,
) -> jax.Array:
    """Mean over the vocabulary of ``hidden @ weight`` (soft-capped when ``softcap`` is set) per row,
    float32 [N], without [N, V]; no gradient (a metric). Uncapped: ``hidden . mean_v W[:, v]``, one
    [H, V] reduction; capped: one blocked forward pass (``linear_mean_logit_xla``, xla_chunked tiles).

    Args:
      hidden: [N, H]; weight: [H, V]; softcap: static positive float or None; block_n, block_v: tiles.
    """
    cap = check_softcap(softcap)
    hidden, weight = jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(weight)
    if cap is None:
        return jnp.dot(hidden.astype(jnp.float32), vocabulary_mean(weight))
    sizes = resolve_block_sizes(_backend(), "xla_chunked", block_n=block_n, block_v=block_v)
    return linear_mean_logit_xla(hidden, weight, softcap=cap, block_n=sizes.block_n, block_v=sizes.block_v)


def _over_mesh(kernel, hidden, weight, ids, bias):
    """``kernel(hidden, weight, ids, bias=bias)``; on a mesh of several devices under ``shard_map``
    (XLA cannot partition a Pallas call): rows split over every mesh axis that divides N, the LM head
    gathered whole on each device (its gradient is summed back over the devices)."""
    mesh = platform.mesh_for_kernels()
    if mesh is None:
        return kernel(hidden, weight, ids, bias=bias)
    rows = platform.spec_entry(platform.dividing_axes(mesh, tuple(mesh.axis_names), hidden.shape[0]))
    row_spec = PartitionSpec(rows, None)
    return jax.shard_map(
        lambda h, w, i, b: kernel(h, w, i, bias=b),
        mesh=mesh,
        in_specs=(row_spec, PartitionSpec(), row_spec, None if bias is None else PartitionSpec()),
        out_specs=(PartitionSpec(None, rows), row_spec),
        check_vma=False,  # Pallas outputs carry no varying-axis types
    )(hidden, weight, ids, bias)


def _resolve(impl: str, backend: str) -> str:
    """Implementation name for ``impl`` on ``backend``."""
    if impl == "auto":
        return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend, "xla_chunked")
    if impl == "pallas":
        return "pallas_tpu" if backend == "tpu" else "pallas_gpu"
    return "xla_chunked" if impl in ("xla", "xla_onepass") else impl


def _check_args(hidden, weight, ids, bias, temperatures, impl) -> tuple[float, ...]:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if hidden.ndim != 2 or weight.ndim != 2 or ids.ndim != 2:
        raise ValueError(
            f"expected hidden [N, H], weight [H, V], ids [N, K']; got {hidden.shape}, {weight.shape}, "
            f"{ids.shape} (flatten leading dims first)"
        )
    if hidden.shape[1] != weight.shape[0] or ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"shape mismatch: hidden {hidden.shape}, weight {weight.shape}, ids {ids.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"ids must be integers, got {ids.dtype}")
    if bias is not None and bias.shape != (weight.shape[1],):
        raise ValueError(f"bias must have shape ({weight.shape[1]},), got {bias.shape}")
    try:
        temps = tuple(float(t) for t in temperatures)
    except TypeError as e:  # a tracer: temperatures select the kernel at trace time
        raise TypeError("temperatures must be static Python floats") from e
    if not temps or any(not t > 0 for t in temps):
        raise ValueError(f"temperatures must be a non-empty sequence of positive floats, got {temps}")
    return temps


def _signature(hidden, weight, ids, bias) -> tuple:
    bias_sig = None if bias is None else (bias.shape, str(bias.dtype))
    return (hidden.shape, str(hidden.dtype), weight.shape, str(weight.dtype), ids.shape, bias_sig)


@functools.lru_cache(maxsize=128)
def _pallas_failure(name: str, signature: tuple, options: tuple) -> str | None:
    """None if the forward and backward Pallas kernels compile for these shapes, else a one-line reason."""
    (h_shape, h_dtype, w_shape, w_dtype, ids_shape, bias_sig) = signature
    opts = dict(options)
    has_bias = bias_sig is not None

    def vjp(hidden, weight, bias, ids, ct):
        def f(h, w, b):
            return _PALLAS[name](h, w, ids, bias=b if has_bias else None, **opts)

        out, pullback = jax.vjp(f, hidden, weight, bias)
        return out, pullback(ct)

    n_t = len(opts["temperatures"])
    shapes = (
        jax.ShapeDtypeStruct(h_shape, h_dtype),
        jax.ShapeDtypeStruct(w_shape, w_dtype),
        jax.ShapeDtypeStruct(*bias_sig) if has_bias else jax.ShapeDtypeStruct((w_shape[1],), w_dtype),
        jax.ShapeDtypeStruct(ids_shape, jnp.int32),
        (jax.ShapeDtypeStruct((n_t, h_shape[0]), jnp.float32), jax.ShapeDtypeStruct(ids_shape, jnp.float32)),
    )
    try:
        jax.jit(vjp).lower(*shapes).compile()
    except PallasUnsupportedError as e:
        return str(e)
    except Exception as e:  # any lowering/compilation failure means: use the XLA path
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first[:160]}"
    return None
