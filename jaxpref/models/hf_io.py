"""Hugging Face checkpoints <-> CausalLM: safetensors key maps, streaming load, sharded save.

Tensors are read one at a time with plain file reads and converted into jaxpref's layout (kernels
[in, out], per-layer tensors stacked on a leading ``layers`` axis): on the device, layer by layer into
the stacked variable, or, when a mesh is given, on the host and then straight into the variable's
shards. Saving writes each shard's header first, then fetches, writes and drops one tensor at a time.
Either way the checkpoint is never held in memory twice: beyond the parameters, one tensor (with a
mesh, one variable) is held at a time.

Files are not memory-mapped: pages of a mapping that have been read count in the process's RSS for as
long as it stays open, which for a sharded checkpoint read variable by variable is the whole checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxpref.errors import ModelError
from jaxpref.models import nf4
from jaxpref.models.config import ModelConfig, load_model_config, resolve_checkpoint_dir
from jaxpref.models.decoder import CausalLM
from jaxpref.models.layers import Embed, Linear, LMHead, NF4Table, RMSNorm
from jaxpref.models.quantize import quantize_model
from jaxpref.models.safetensors_io import SafetensorsReader, write_safetensors
from jaxpref.sharding import Rules, state_shardings, variable_sharding

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass
class TensorSpec:
    """How one jaxpref variable maps to Hugging Face tensor(s).

    ``module`` is the module path in jaxpref (e.g. ("layers", "self_attn", "q_proj")); stacked
    variables map to one HF tensor per layer. ``in_ndim`` > 0 marks a kernel stored [*in, *out] in
    jaxpref and [prod(out), prod(in)] in HF. ``nf4``: the projection whose kernel is stored as NF4
    arrays (QLoRA; ``variable`` is then its codes): each HF tensor is quantized as read.
    """

    module: tuple[str, ...]
    suffix: str
    variable: nnx.Variable
    num_layers: int | None
    in_ndim: int = 0
    nf4: Linear | None = None
    nf4_table: NF4Table | None = None

    @property
    def layer_shape(self) -> tuple[int, ...]:
        if self.nf4_table is not None:
            v, half = self.variable.shape
            return (v, 2 * half)
        if self.nf4 is not None:
            return self.nf4.in_shape + self.nf4.out_shape
        shape = tuple(self.variable.shape)
        return shape[1:] if self.num_layers is not None else shape

    @property
    def hf_shape(self) -> tuple[int, ...]:
        shape = self.layer_shape
        if self.in_ndim:
            return (math.prod(shape[self.in_ndim :]), math.prod(shape[: self.in_ndim]))
        if self.suffix == "bias":
            return (math.prod(shape),)
        return shape

    def hf_names(self) -> list[str]:
        if self.num_layers is None:
            return [f"{hf_module_name(self.module)}.{self.suffix}"]
        return [f"{hf_module_name(self.module, i)}.{self.suffix}" for i in range(self.num_layers)]

    def to_jax(self, t: np.ndarray) -> np.ndarray:
        """One HF tensor -> one layer's array in jaxpref layout."""
        if self.in_ndim:
            t = t.T
        return t.reshape(self.layer_shape)

    def to_hf(self, a: np.ndarray) -> np.ndarray:
        """One layer's jaxpref array -> the HF tensor."""
        if self.in_ndim:
            shape = self.layer_shape
            return a.reshape(math.prod(shape[: self.in_ndim]), -1).T
        return a.reshape(self.hf_shape)


def hf_module_name(module: Sequence[str], layer: int | None = None) -> str:
    """jaxpref module path -> transformers module name (``model.layers.3.self_attn.q_proj``)."""
    if module[0] == "lm_head":
        return "lm_head"
    if module[0] == "layers":
        return ".".join(["model", "layers", str(layer), *module[1:]])
    return ".".join(["model", *module])


def iter_modules(model: CausalLM) -> Iterator[tuple[tuple[str, ...], nnx.Module]]:
    """(path, module) for every module of the model, paths as string tuples."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            yield tuple(str(p) for p in path), node


def tensor_specs(model: CausalLM) -> list[TensorSpec]:
    """Base-model tensors in transformers' order of appearance (adapters excluded)."""
    n_layers = model.config.num_hidden_layers
    specs = []
    for path, mod in iter_modules(model):
        stacked = n_layers if path and path[0] == "layers" else None
        if isinstance(mod, Linear) and mod.nf4_codes is not None:
            specs.append(TensorSpec(path, "weight", mod.nf4_codes, stacked, len(mod.in_shape), nf4=mod))
            if mod.bias is not None:
                specs.append(TensorSpec(path, "bias", mod.bias, stacked))
        elif isinstance(mod, Linear):
            specs.append(TensorSpec(path, "weight", mod.kernel, stacked, in_ndim=len(mod.in_shape)))
            if mod.bias is not None:
                specs.append(TensorSpec(path, "bias", mod.bias, stacked))
        elif isinstance(mod, NF4Table) and mod.nf4_codes is not None:
            specs.append(TensorSpec(path, "weight", mod.nf4_codes, None, nf4_table=mod))
        elif isinstance(mod, LMHead):
            specs.append(TensorSpec(path, "weight", mod.kernel, None, in_ndim=1))
        elif isinstance(mod, Embed):
            specs.append(TensorSpec(path, "weight", mod.embedding, None))
        elif isinstance(mod, RMSNorm):
            specs.append(TensorSpec(path, "weight", mod.scale, stacked))
    return sorted(specs, key=_spec_order)


def hf_sort_key(name: str) -> tuple:
    """Order HF tensor names embeddings, layer 0, layer 1, ..., final norm, lm_head."""
    m = re.match(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if "embed_tokens" in name else 2, 0, name)


def _spec_order(spec: TensorSpec) -> tuple:
    rank = {"embed_tokens": 0, "layers": 1, "norm": 2, "lm_head": 3}
    return (rank.get(spec.module[0], 4), spec.module, spec.suffix)


def _check_keys(expected: set[str], present: set[str], config: ModelConfig, where: str) -> None:
    ignorable = {k for k in present if k.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        ignorable.add("lm_head.weight")
    missing = sorted(expected - present)
    unexpected = sorted(present - expected - ignorable)
    if missing or unexpected:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:20]) + (f" ... ({len(keys)} in all)" if len(keys) > 20 else "")

        parts = []
        if missing:
            parts.append(f"missing tensors: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {show(unexpected)}")
        raise ModelError(f"{where}: checkpoint does not match config.json ({'; '.join(parts)})")


def place(host: np.ndarray, variable: nnx.Variable, mesh: Mesh | None, rules: Rules | None) -> jax.Array:
    """Host array -> device array, split into the variable's shards when a mesh is given."""
    if mesh is None:
        return jnp.asarray(host)
    sharding: NamedSharding = variable_sharding(variable, mesh, rules)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def load_specs(
    specs: Sequence[TensorSpec],
    reader: SafetensorsReader,
    dtype: Any,
    *,
    mesh: Mesh | None,
    rules: Rules | None,
    where: str,
) -> None:
    """Fill each spec's variable from the checkpoint, one (stacked) variable at a time.

    Without a mesh each tensor goes to the device as read (on CPU without a copy) and is transposed,
    converted and written into its layer there, in place (a stacked variable starts as zeros): memory
    beyond the parameters is one checkpoint tensor, and the parameters are JAX's own buffers, which
    donation reuses. With a mesh a variable is assembled on the host, then split into its shards.
    """
    dtype = np.dtype(dtype)

    def read(spec: TensorSpec, name: str) -> np.ndarray:
        shape = reader.entry(name).shape
        if shape != spec.hf_shape:
            raise ModelError(f"{where}: tensor {name} has shape {shape}, expected {spec.hf_shape}")
        return reader.get(name)

    for spec in specs:
        names = spec.hf_names()
        if spec.nf4 is not None:
            _load_nf4(spec, names, read, mesh, rules)
            continue
        if spec.nf4_table is not None:
            _load_nf4_table(spec.nf4_table, read(spec, names[0]), mesh, rules)
            continue
        if mesh is None:
            # Waiting for each update bounds the tensors in flight to one (dispatch is asynchronous).
            if spec.num_layers is None:
                t = jax.device_put(read(spec, names[0]), may_alias=True)
                value = _to_jax_on_device(t, spec.in_ndim, spec.layer_shape, dtype).block_until_ready()
                del t
            else:
                value = jnp.zeros(spec.variable.shape, dtype)
                for i, name in enumerate(names):
                    t = jax.device_put(read(spec, name), may_alias=True)
                    value = _set_layer_on_device(value, t, i, spec.in_ndim).block_until_ready()
                    del t
        else:
            host = np.empty(spec.variable.shape, dtype=dtype)
            for i, name in enumerate(names):
                t = read(spec, name)
                if spec.num_layers is None:
                    host[...] = spec.to_jax(t)
                else:
                    host[i] = spec.to_jax(t)
                del t
            value = place(host, spec.variable, mesh, rules)
            del host
        spec.variable.set_value(value)


def _load_nf4(spec: TensorSpec, names: list[str], read: Any, mesh: Mesh | None, rules: Rules | None) -> None:
    """Quantize a stacked projection's HF tensors ([out, in], bitsandbytes' order) one layer at a time into
    its NF4 arrays: the float weights are never all held (one layer's tensor and its float32 copy are)."""
    lin = spec.nf4
    cfg = nf4.NF4Config(double_quant=lin.nf4_absmax2 is not None)
    variables = nf4.NF4Arrays(lin.nf4_codes, lin.nf4_absmax, lin.nf4_absmax2, lin.nf4_offset)
    if mesh is None:
        stacked = nf4.NF4Arrays(*(None if v is None else jnp.zeros(v.shape, v.dtype) for v in variables))
        for i, name in enumerate(names):
            t = jax.device_put(read(spec, name), may_alias=True)
            stacked = _set_nf4_layer(stacked, t, i, cfg)
            jax.block_until_ready(stacked)
            del t
        values = stacked
    else:
        host = [None if v is None else np.empty(v.shape, np.dtype(v.dtype)) for v in variables]
        for i, name in enumerate(names):
            layer = jax.device_get(_quantize_hf(jax.device_put(read(spec, name)), cfg))
            for h, q in zip(host, layer):
                if h is not None:
                    h[i] = q
        values = [None if v is None else place(h, v, mesh, rules) for h, v in zip(host, variables)]
    for var, value in zip(variables, values):
        if var is not None:
            var.set_value(value)


def _load_nf4_table(table: NF4Table, t: np.ndarray, mesh: Mesh | None, rules: Rules | None) -> None:
    """Quantize an embedding / LM-head tensor [V, H] as read into the table's NF4 arrays (in chunks of rows:
    beyond the tensor as read, no float32 copy of it is made)."""
    cfg = nf4.NF4Config(double_quant=table.nf4_absmax2 is not None)
    values = _quantize_table_hf(jax.device_put(t, may_alias=True), cfg)
    jax.block_until_ready(values)
    del t
    variables = (table.nf4_codes, table.nf4_absmax, table.nf4_absmax2, table.nf4_offset)
    for var, value in zip(variables, values):
        if var is not None:
            var.set_value(value if mesh is None else place(np.asarray(jax.device_get(value)), var, mesh, rules))


@functools.partial(jax.jit, static_argnums=(1,))
def _quantize_table_hf(t: jax.Array, cfg: nf4.NF4Config) -> nf4.NF4Arrays:
    return nf4.quantize_table(t, cfg)


@functools.partial(jax.jit, static_argnums=(1,))
def _quantize_hf(t: jax.Array, cfg: nf4.NF4Config) -> nf4.NF4Arrays:
    return nf4.quantize(t, cfg)


@functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0,))
def _set_nf4_layer(stacked: nf4.NF4Arrays, t: jax.Array, i: int | jax.Array, cfg: nf4.NF4Config) -> nf4.NF4Arrays:
    """Layer i of the stacked NF4 arrays set to the quantization of ``t`` [out, in], in place."""
    layer = nf4.quantize(t, cfg)
    return jax.tree.map(lambda s, q: jax.lax.dynamic_update_index_in_dim(s, q, i, 0), stacked, layer)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _to_jax_on_device(t: jax.Array, in_ndim: int, shape: tuple[int, ...], dtype: np.dtype) -> jax.Array:
    """``TensorSpec.to_jax`` and the cast to the parameter dtype, compiled (a new buffer, not ``t``'s)."""
    return (t.T if in_ndim else t).reshape(shape).astype(dtype)


@functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0,))
def _set_layer_on_device(stacked: jax.Array, t: jax.Array, i: int | jax.Array, in_ndim: int) -> jax.Array:
    """``stacked.at[i].set(to_jax(t))`` in place (``stacked`` is donated)."""
    layer = (t.T if in_ndim else t).reshape(stacked.shape[1:]).astype(stacked.dtype)
    return jax.lax.dynamic_update_index_in_dim(stacked, layer, i, 0)


def abstract_model(config: ModelConfig, **kwargs: Any) -> CausalLM:
    """A CausalLM whose variables are shape/dtype placeholders (no memory, no init compute)."""
    return nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0), **kwargs))


def from_pretrained(
    path_or_repo_id: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    remat_policy: str = "none",
    scan_layers: bool = True,
    attention_impl: str = "auto",
    quantization: nf4.NF4Config | None = None,
) -> CausalLM:
    """Load a transformers checkpoint (directory or hub id) into a CausalLM.

    Args:
      dtype: compute dtype. param_dtype: storage dtype; None means float32 (full-precision weights).
      mesh, rules: when a mesh is given each parameter is placed into the sharding that its logical
        axes and ``rules`` (default ``jaxpref.sharding.DEFAULT_RULES``) give.
      quantization: QLoRA: the block projections are quantized to NF4 as they are read, one layer at a time
        (and the embedding / LM head, one tensor at a time, with ``quantize_embeddings``).
    """
    path = resolve_checkpoint_dir(path_or_repo_id)
    config = load_model_config(path)
    param_dtype = jnp.dtype(jnp.float32 if param_dtype is None else param_dtype)
    model = abstract_model(
        config,
        dtype=dtype,
        param_dtype=param_dtype,
        remat_policy=remat_policy,
        scan_layers=scan_layers,
        attention_impl=attention_impl,
    )
    if quantization is not None:
        quantize_model(model, quantization)
    specs = tensor_specs(model)
    with SafetensorsReader.for_checkpoint(path) as reader:
        _check_keys({n for s in specs for n in s.hf_names()}, reader.keys(), config, str(path_or_repo_id))
        load_specs(specs, reader, param_dtype, mesh=mesh, rules=rules, where=str(path_or_repo_id))
    return model


def from_config(
    config: ModelConfig,
    *,
    seed: int = 0,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    remat_policy: str = "none",
    scan_layers: bool = True,
    attention_impl: str = "auto",
    quantization: nf4.NF4Config | None = None,
) -> CausalLM:
    """Random initialisation as transformers does it: normal(0, initializer_range) weights, zero
    biases, unit norms. With a mesh, parameters are created directly in their shards.
    ``quantization`` (QLoRA): the block projections are then quantized to NF4, layer by layer (the float
    weights exist at first: random initialisation is for tests and benchmarks)."""
    kwargs = dict(
        dtype=dtype,
        param_dtype=param_dtype,
        remat_policy=remat_policy,
        scan_layers=scan_layers,
        attention_impl=attention_impl,
    )

    def make() -> CausalLM:
        return CausalLM(config, rngs=nnx.Rngs(params=seed), **kwargs)

    # Jitted initialisation instead of hundreds of small eager ops (seconds on CPU), in groups of about
    # INIT_GROUP_BYTES of parameters: one jit for a whole 1B model holds the float32 draws of every
    # weight at once (9 GiB of temporaries for 2.3 GiB of bfloat16 Llama-3.2-1B weights). Each group's
    # jit traces the whole model and keeps only its own arrays; every weight draws from its own key, so
    # the values do not depend on the grouping.
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
    shapes, treedef = jax.tree.flatten(abstract_state)
    shardings = [None] * len(shapes)
    if mesh is not None:
        shardings = jax.tree.leaves(state_shardings(abstract_state, mesh, rules))
    def init_group(group: list[int]) -> list[jax.Array]:
        leaves = jax.tree.leaves(nnx.state(make()))
        return [leaves[i] for i in group]

    values: list[Any] = [None] * len(shapes)
    for group in _init_groups(shapes):
        init = jax.jit(functools.partial(init_group, group), out_shardings=[shardings[i] for i in group])
        for i, value in zip(group, init()):
            values[i] = value
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, values))
    if quantization is not None:
        quantize_model(model, quantization)
    return model


INIT_GROUP_BYTES = 512 * 2**20


def _init_groups(shapes: list[Any]) -> list[list[int]]:
    """Indices of ``shapes`` in consecutive groups of at most ``INIT_GROUP_BYTES`` (or one array)."""
    groups: list[list[int]] = [[]]
    total = 0
    for i, s in enumerate(shapes):
        size = int(np.prod(s.shape)) * jnp.dtype(s.dtype).itemsize
        if groups[-1] and total + size > INIT_GROUP_BYTES:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def to_host(x: jax.Array) -> np.ndarray:
    """Gather a (possibly multi-host sharded) array to a numpy array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _dtype_name(dt: Any) -> str:
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[np.dtype(dt).name]


def save_pretrained(
    model: CausalLM, out_dir: str | os.PathLike, *, dtype: Any = None, max_shard_size: int = 5 * 1024**3
) -> None:
    """Write config.json + safetensors that ``transformers.AutoModelForCausalLM`` loads.

    dtype: tensor dtype on disk; None keeps the parameter dtype. Models with LoRA adapters must be
    merged first (``jaxpref.lora.merge_lora``) or exported with ``export_peft_adapter``.
    """
    if model.lora_config is not None:
        raise ModelError(
            "save_pretrained needs a model without LoRA: call jaxpref.lora.merge_lora(model) "
            "first, or export the adapter with jaxpref.lora.export_peft_adapter"
        )
    out_dir = os.fspath(out_dir)
    out_dtype = np.dtype(model.param_dtype if dtype is None else jnp.dtype(dtype))
    tensors = []
    for spec in tensor_specs(model):
        for i, name in enumerate(spec.hf_names()):

            def fetch(spec: TensorSpec = spec, i: int = i) -> np.ndarray:
                value = spec.variable[...]
                return spec.to_hf(to_host(value if spec.num_layers is None else value[i]))

            tensors.append((name, spec.hf_shape, out_dtype, fetch))
    tensors.sort(key=lambda t: hf_sort_key(t[0]))
    write_safetensors(tensors, out_dir, base="model", max_shard_size=max_shard_size)
    if jax.process_index() == 0:
        d = model.config.to_hf_dict()
        d.pop("torch_dtype", None)
        d["dtype"] = _dtype_name(out_dtype)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(d, f, indent=2, sort_keys=True)
