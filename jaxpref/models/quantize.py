"""QLoRA base models: the decoder layers' projection kernels stored as frozen NF4 (``jaxpref.models.nf4``).

As bitsandbytes/PEFT QLoRA: every linear projection of the blocks is quantized; the token embedding,
the LM head and the norms stay in ``param_dtype`` unless ``NF4Config.quantize_embeddings`` (jaxpref's
opt-in) stores the embedding and an untied LM head as NF4 too. Each weight is quantized per layer in transformers'
[out, in] layout (so its codes equal bitsandbytes' for the same tensor), one layer at a time under
``lax.map``: beyond the quantized arrays, one layer's float32 weight is live.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpref.errors import ModelError
from jaxpref.models import nf4
from jaxpref.models.decoder import CausalLM
from jaxpref.models.layers import Linear


def block_linears(model: CausalLM) -> Iterator[Linear]:
    """The projections of the decoder blocks (stacked on ``layers``): what QLoRA quantizes."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear) and path and str(path[0]) == "layers":
            yield node


def _dims(lin: Linear) -> tuple[int, int]:
    return math.prod(lin.in_shape), math.prod(lin.out_shape)


@functools.partial(jax.jit, static_argnums=(1, 2))
def quantize_layers(kernel: jax.Array, d_in: int, cfg: nf4.NF4Config) -> nf4.NF4Arrays:
    """Stacked kernel [L, *in, *out] (jaxpref layout) -> stacked NF4 arrays, one layer at a time."""
    return jax.lax.map(lambda k: nf4.quantize(k.reshape(d_in, -1).T, cfg), kernel)


def dequantized_kernel(lin: Linear, dtype: Any) -> jax.Array:
    """The stacked kernel [L, *in, *out] of an NF4 projection, dequantized (float32 values cast to ``dtype``)."""
    q = lin.nf4_arrays()
    if q is None:
        raise ModelError("dequantized_kernel: the projection is not quantized")
    d_in, d_out = _dims(lin)
    shape = (q.codes.shape[0], *lin.in_shape, *lin.out_shape)

    def one(arrays: nf4.NF4Arrays) -> jax.Array:
        return nf4.dequantize(arrays, (d_out, d_in), jnp.float32).T.astype(dtype)

    return jax.lax.map(one, q).reshape(shape)


def quantize_model(model: CausalLM, cfg: nf4.NF4Config) -> None:
    """Replace every block projection's kernel by NF4 arrays, in place (placeholders for an abstract model).

    A concrete kernel is quantized layer by layer and released; ``model.quantization`` records ``cfg``.
    """
    if model.quantization is not None:
        raise ModelError("quantize_model: the model is already quantized")
    if model.lora_config is not None:
        raise ModelError("quantize_model: quantize the base model before attaching LoRA")
    n_layers = model.config.num_hidden_layers
    for lin in block_linears(model):
        d_in, d_out = _dims(lin)
        value = lin.kernel.get_value()
        if isinstance(value, jax.ShapeDtypeStruct):
            arrays = nf4.abstract_arrays(d_in * d_out, cfg, (n_layers,))
        else:
            arrays = quantize_layers(value, d_in, cfg)
        lin.set_nf4(arrays, ("layers",))
    if cfg.quantize_embeddings:
        quantize_tables(model, cfg)
    model.quantization = cfg


def quantize_tables(model: CausalLM, cfg: nf4.NF4Config) -> None:
    """The token embedding (and an untied LM head) as NF4 too (``qlora_quantize_embeddings``), each quantized
    as transformers' [V, H] tensor; a concrete table in chunks of rows (``nf4.quantize_table``)."""
    tables = [(model.embed_tokens, model.embed_tokens.embedding, False)]
    if model.lm_head is not None:
        tables.append((model.lm_head, model.lm_head.kernel, True))
    for module, var, transposed in tables:
        value = var.get_value()
        v, h = model.config.vocab_size, model.config.hidden_size
        if isinstance(value, jax.ShapeDtypeStruct):
            arrays = nf4.abstract_table(v, h, cfg)
        else:
            arrays = _quantize_table(value, transposed, cfg)
        module.set_nf4(arrays)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_table(value: jax.Array, transposed: bool, cfg: nf4.NF4Config) -> nf4.NF4Arrays:
    return nf4.quantize_table(value.T if transposed else value, cfg)


def base_weight_bytes(model: CausalLM) -> dict[str, int]:
    """Bytes of the base model's weights (LoRA excluded): ``quantized`` (NF4 arrays), ``float`` (the rest)."""
    out = {"quantized": 0, "float": 0}
    for _, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Variable) or isinstance(var, nnx.LoRAParam):
            continue
        value = var.get_value()
        if not hasattr(value, "shape"):
            continue
        size = math.prod(value.shape) * jnp.dtype(value.dtype).itemsize
        if isinstance(var, nf4.NF4Weight):
            out["quantized"] += size
        elif isinstance(var, nnx.Param):
            out["float"] += size
    return out
