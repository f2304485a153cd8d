"""Hugging Face checkpoints <-> CausalLM: safetensors key maps, streaming load, sharded save.

Tensors are read one at a time (memory-mapped by ``safetensors``), converted into jaxpref's layout
(kernels [in, out], per-layer tensors stacked on a leading ``layers`` axis) and placed straight into
their shards when a mesh is given; the checkpoint is never held in host memory twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy reader needs)
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxpref.errors import ModelError
from jaxpref.models.config import ModelConfig, load_model_config
from jaxpref.models.decoder import CausalLM
from jaxpref.models.layers import Embed, Linear, LMHead, RMSNorm
from jaxpref.sharding import Rules, state_shardings, variable_sharding

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_checkpoint_dir(
    path_or_repo_id: str | os.PathLike, *, patterns: Sequence[str] = ("*.json", "*.safetensors")
) -> str:
    """A local directory, or a hub id downloaded with ``huggingface_hub`` (files matching patterns)."""
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ModelError(f"{path}: not a checkpoint directory")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=list(patterns))
    except Exception as e:  # offline, unknown repo, gated, ...: all user-fixable
        raise ModelError(
            f"{path}: not a local directory, and downloading it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {e}). Offline machines need a local checkpoint directory."
        ) from e


@dataclasses.dataclass
class TensorSpec:
    """How one jaxpref variable maps to Hugging Face tensor(s).

    ``module`` is the module path in jaxpref (e.g. ("layers", "self_attn", "q_proj")); stacked
    variables map to one HF tensor per layer. ``in_ndim`` > 0 marks a kernel stored [*in, *out] in
    jaxpref and [prod(out), prod(in)] in HF.
    """

    module: tuple[str, ...]
    suffix: str
    variable: nnx.Variable
    num_layers: int | None
    in_ndim: int = 0

    @property
    def layer_shape(self) -> tuple[int, ...]:
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
        if isinstance(mod, Linear):
            specs.append(TensorSpec(path, "weight", mod.kernel, stacked, in_ndim=len(mod.in_shape)))
            if mod.bias is not None:
                specs.append(TensorSpec(path, "bias", mod.bias, stacked))
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


class SafetensorsReader:
    """Lazy tensor-by-tensor access to a single-file or sharded (indexed) safetensors checkpoint."""

    def __init__(self, files: dict[str, str]):
        self._files = files  # tensor name -> file
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}

    @classmethod
    def for_file(cls, file: str) -> SafetensorsReader:
        with safe_open(file, framework="numpy") as f:
            return cls(dict.fromkeys(f.keys(), file))  # noqa: SIM118 (safe_open has no __iter__)

    @classmethod
    def for_checkpoint(cls, path: str) -> SafetensorsReader:
        """Reader over ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``."""
        index_path = os.path.join(path, SAFETENSORS_INDEX)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            return cls({k: os.path.join(path, v) for k, v in weight_map.items()})
        if os.path.isfile(os.path.join(path, SAFETENSORS_NAME)):
            return cls.for_file(os.path.join(path, SAFETENSORS_NAME))
        raise ModelError(
            f"{path}: no {SAFETENSORS_NAME} or {SAFETENSORS_INDEX} (only safetensors checkpoints load; "
            "convert .bin files with transformers' save_pretrained)"
        )

    def keys(self) -> set[str]:
        return set(self._files)

    def get(self, name: str) -> np.ndarray:
        file = self._files[name]
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(file, framework="numpy"))
        return self._handles[file].get_tensor(name)

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


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
    """Fill each spec's variable from the checkpoint, one (stacked) variable at a time."""
    for spec in specs:
        host = np.empty(spec.variable.shape, dtype=dtype)
        for i, name in enumerate(spec.hf_names()):
            t = reader.get(name)
            if tuple(t.shape) != spec.hf_shape:
                raise ModelError(f"{where}: tensor {name} has shape {tuple(t.shape)}, expected {spec.hf_shape}")
            if spec.num_layers is None:
                host[...] = spec.to_jax(t)
            else:
                host[i] = spec.to_jax(t)
        spec.variable.set_value(place(host, spec.variable, mesh, rules))
        del host


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
) -> CausalLM:
    """Load a transformers checkpoint (directory or hub id) into a CausalLM.

    Args:
      dtype: compute dtype. param_dtype: storage dtype; None means float32 (full-precision weights).
      mesh, rules: when a mesh is given each parameter is placed into the sharding that its logical
        axes and ``rules`` (default ``jaxpref.sharding.DEFAULT_RULES``) give.
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
) -> CausalLM:
    """Random initialisation as transformers does it: normal(0, initializer_range) weights, zero
    biases, unit norms. With a mesh, parameters are created directly in their shards."""
    kwargs = dict(
        dtype=dtype,
        param_dtype=param_dtype,
        remat_policy=remat_policy,
        scan_layers=scan_layers,
        attention_impl=attention_impl,
    )

    def make() -> CausalLM:
        return CausalLM(config, rngs=nnx.Rngs(params=seed), **kwargs)

    # One jitted initialisation instead of hundreds of small eager ops (seconds on CPU).
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
    shardings = None if mesh is None else state_shardings(abstract_state, mesh, rules)
    state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def to_host(x: jax.Array) -> np.ndarray:
    """Gather a (possibly multi-host sharded) array to a numpy array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def write_safetensors(
    tensors: Sequence[tuple[str, tuple[int, ...], Any, Any]], out_dir: str, *, base: str, max_shard_size: int
) -> None:
    """Write (name, shape, dtype, fetch) tensors as ``{base}.safetensors`` or shards plus an index.

    ``fetch()`` returns the numpy array; it is called one shard at a time so at most one shard sits
    in host memory. Only process 0 writes (all processes fetch, which may gather across hosts).
    """
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dt, _) in enumerate(tensors):
        nbytes = math.prod(shape) * np.dtype(dt).itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    weight_map, total = {}, 0
    for s, idx in enumerate(shards):
        fname = f"{base}.safetensors" if len(shards) == 1 else f"{base}-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {}
        for i in idx:
            name, _, dt, fetch = tensors[i]
            arrays[name] = np.ascontiguousarray(fetch().astype(dt))
            total += arrays[name].nbytes
            weight_map[name] = fname
        if writer:
            save_file(arrays, os.path.join(out_dir, fname), metadata={"format": "pt"})
        del arrays
    if writer and len(shards) > 1:
        with open(os.path.join(out_dir, f"{base}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


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
