"""Native LoRA for ``jaxpref.models.CausalLM``: attach, train-only-adapters filter, PEFT export and
import, merge.

Adapters live inside the model's projections as ``nnx.LoRAParam`` (A [*in, r], B [r, *out], stacked
on the ``layers`` axis like every layer weight); the forward adds ``alpha / r * dropout(x) A B``.
``modules_to_save`` (embed_tokens, lm_head) become full trainable copies, stored as
``ModulesToSaveParam`` (a ``LoRAParam`` subclass), so the originals stay available for
``use_adapters=False`` (the DPO/KTO reference model without a second model copy).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxpref.errors import ModelError
from jaxpref.models.decoder import CausalLM
from jaxpref.models.hf_io import abstract_model, hf_module_name, hf_sort_key, iter_modules, place, to_host
from jaxpref.models.layers import Linear, NF4Table, make_param
from jaxpref.models.nf4 import NF4Weight
from jaxpref.models.quantize import dequantized_kernel
from jaxpref.models.safetensors_io import SafetensorsReader, write_safetensors
from jaxpref.precision import ADAPTER_DTYPE
from jaxpref.sharding import Rules, logical_to_spec

logger = logging.getLogger(__name__)

#: The block's linear projections in Llama-family models (Llama, Mistral, Qwen2/3) ...
PEFT_TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: ... and in Phi-3, whose checkpoints fuse q/k/v and gate/up (PEFT's names for Phi-3 too).
FUSED_TARGET_NAMES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
KNOWN_TARGET_NAMES = (
    "q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj"
)  # fmt: skip
#: ``lora_target_modules: all-linear`` / ``lora_target_linear: true``: every linear projection of the
#: blocks, resolved against the model by ``apply_lora`` (as PEFT resolves "all-linear").
ALL_LINEAR = "all-linear"
SAVEABLE_MODULES = ("embed_tokens", "lm_head")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."

#: Base-model weights only (LoRAParam subclasses Param, so ``nnx.Param`` alone includes adapters), the
#: frozen NF4 arrays of a QLoRA base included.
BASE_PARAMS = nnx.Any(nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)), NF4Weight)


class ModulesToSaveParam(nnx.LoRAParam):
    """Full trainable copy of a module's weight (PEFT ``modules_to_save``); trained like an adapter."""


def resolve_target_modules(target_modules: str | Iterable[str] | None, target_linear: bool = False) -> tuple[str, ...]:
    """PEFT target names from ``lora_target_modules`` / ``lora_target_linear``, in a fixed order.

    ``target_linear=True`` or "all-linear" gives ``(ALL_LINEAR,)``: every linear projection of the
    blocks, which ``apply_lora`` resolves for the model's family. Names are checked against the
    model's own projections there too (``model_target_modules``).
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    names = list(target_modules or ())
    if target_linear or ALL_LINEAR in names:
        return (ALL_LINEAR,)
    unknown = sorted(set(names) - set(KNOWN_TARGET_NAMES))
    if unknown:
        raise ModelError(
            f"lora_target_modules: {unknown} not supported; use names from {list(KNOWN_TARGET_NAMES)}"
            " or lora_target_linear: true"
        )
    if not names:
        raise ModelError(
            "lora_target_modules is empty: list projections (e.g. [q_proj, v_proj]) or set lora_target_linear: true"
        )
    return tuple(n for n in KNOWN_TARGET_NAMES if n in names)


def model_target_modules(config: Any, targets: Sequence[str]) -> tuple[str, ...]:
    """``targets`` (from ``resolve_target_modules``) for a model of ``config`` (a ``ModelConfig``):
    ``ALL_LINEAR`` becomes the family's projections; a name the family lacks is a ``ModelError``.

    Phi-3's checkpoints fuse q/k/v (``qkv_proj``) and gate/up (``gate_up_proj``), and PEFT names its
    LoRA layers by those modules, so ``q_proj`` etc. are rejected rather than mapped: a LoRA on
    ``q_proj`` alone has no PEFT equivalent for Phi-3 (PEFT adapts whole modules).
    """
    fused = config.fused_projections
    family = FUSED_TARGET_NAMES if fused else PEFT_TARGET_NAMES
    if ALL_LINEAR in targets:
        return family
    absent = [n for n in targets if n not in family]
    if absent and fused:
        raise ModelError(
            f"lora_target_modules: {absent} do not exist in {config.model_type} models, which fuse q/k/v into "
            "qkv_proj and gate/up into gate_up_proj (as their checkpoints and PEFT do); use names from "
            f"{list(FUSED_TARGET_NAMES)}, e.g. lora_target_modules: [qkv_proj, o_proj, gate_up_proj, down_proj]"
        )
    if absent:
        raise ModelError(
            f"lora_target_modules: {absent} are Phi-3's fused projections; this {config.model_type} model has "
            f"separate ones: use names from {list(PEFT_TARGET_NAMES)}"
        )
    return tuple(targets)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters (PEFT meaning): rank r, scaling alpha / r, dropout on the LoRA input."""

    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", resolve_target_modules(self.target_modules))
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save or ()))
        if not (isinstance(self.r, int) and self.r > 0):
            raise ModelError(f"lora_r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"lora_dropout must be in [0, 1), got {self.dropout!r}")
        bad = sorted(set(self.modules_to_save) - set(SAVEABLE_MODULES))
        if bad:
            raise ModelError(f"lora_modules_to_save: {bad} not supported; allowed: {list(SAVEABLE_MODULES)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def _lora_linears(model: CausalLM, targets: Sequence[str]) -> list[tuple[tuple[str, ...], Linear]]:
    return [(p, m) for p, m in iter_modules(model) if isinstance(m, Linear) and p[0] == "layers" and p[-1] in targets]


def _create(
    init: Any, args: tuple[np.ndarray, ...], axes: Sequence[str], mesh: Mesh | None, rules: Rules | None
) -> jax.Array:
    """``init(*args)`` computed straight into the shards ``axes`` give on ``mesh`` (no mesh: default device).

    ``args`` are host arrays, so nothing is first built on one device and then copied to the others
    (which would need the whole tensor on one device and fails across hosts).
    """
    if mesh is None:
        return init(*args)
    shape = jax.eval_shape(init, *args).shape
    sharding = NamedSharding(mesh, logical_to_spec(tuple(axes), shape, mesh, rules))
    return jax.jit(init, out_shardings=sharding)(*args)


def apply_lora(
    model: CausalLM, cfg: LoraConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None, rules: Rules | None = None
) -> None:
    """Attach LoRA adapters in place: A ~ U(+-1/sqrt(fan_in)) (PEFT's kaiming-uniform), B = 0.

    Adapters are float32 whatever the base model's dtype (PEFT's ``autocast_adapter_dtype``): they
    are small, and bfloat16 adapters would lose small updates. ``modules_to_save`` copies keep the
    base module's dtype (PEFT copies the module).

    With tied embeddings, embed_tokens and lm_head name the same table: one trainable copy serves
    both (PEFT's ``ensure_weight_tying``). ``mesh``/``rules`` place the new parameters in shards.
    """
    if model.lora_config is not None:
        raise ModelError("model already has LoRA adapters")
    cfg = dataclasses.replace(cfg, target_modules=model_target_modules(model.config, cfg.target_modules))
    n_layers = model.config.num_hidden_layers
    pdt = ADAPTER_DTYPE  # float32 whatever the base's dtype, as PEFT's autocast_adapter_dtype
    for _, lin in _lora_linears(model, cfg.target_modules):
        bound = 1.0 / math.sqrt(math.prod(lin.in_shape))
        key = rngs.params()
        impl = jax.random.key_impl(key)
        # concrete keys travel as host data (no device-to-device copy); under eval_shape they are tracers
        key_data = jax.random.key_data(key)
        key_data = key_data if isinstance(key_data, jax.core.Tracer) else np.asarray(key_data)
        a_shape, b_shape = (n_layers, *lin.in_shape, cfg.r), (n_layers, cfg.r, *lin.out_shape)
        a_axes, b_axes = ("layers", *lin.in_axes, "lora_rank"), ("layers", "lora_rank", *lin.out_axes)

        def init_a(
            kd: jax.Array, shape: tuple[int, ...] = a_shape, bound: float = bound, impl: Any = impl
        ) -> jax.Array:
            k = jax.random.wrap_key_data(kd, impl=impl)
            return jax.random.uniform(k, shape, jnp.float32, -bound, bound).astype(pdt)

        lin.lora_a = make_param(_create(init_a, (key_data,), a_axes, mesh, rules), a_axes, nnx.LoRAParam)
        zeros = _create(lambda shape=b_shape: jnp.zeros(shape, pdt), (), b_axes, mesh, rules)
        lin.lora_b = make_param(zeros, b_axes, nnx.LoRAParam)
        lin.lora_scaling, lin.lora_dropout = cfg.scaling, cfg.dropout
    saved = set(cfg.modules_to_save)
    if saved and model.embed_tokens.nf4_codes is not None:
        raise ModelError(
            f"modules_to_save {sorted(saved)} with NF4 embeddings (qlora_quantize_embeddings): a trainable copy "
            "of the table would hold it in full precision (plus its optimizer state), undoing the saving; "
            "remove them from lora_modules_to_save or set qlora_quantize_embeddings: false"
        )
    if model.lm_head is None and saved:
        if saved != {"embed_tokens"}:
            logger.warning(
                "lora_modules_to_save %s: this model ties lm_head to embed_tokens (tie_word_embeddings), so "
                "they are one table, trained as one copy (PEFT's ensure_weight_tying); the adapter lists "
                "modules_to_save [embed_tokens], as PEFT writes it.",
                sorted(saved),
            )
        saved = {"embed_tokens"}
        cfg = dataclasses.replace(cfg, modules_to_save=("embed_tokens",))
    if "embed_tokens" in saved:
        emb = model.embed_tokens
        emb.embedding_copy = make_param(jnp.copy(emb.embedding[...]), ("vocab", "embed"), ModulesToSaveParam)
    if "lm_head" in saved:
        model.lm_head.kernel_copy = make_param(
            jnp.copy(model.lm_head.kernel[...]), ("embed", "vocab"), ModulesToSaveParam
        )
    model.lora_config = cfg
    model.lora_dropout = cfg.dropout
    if cfg.dropout > 0:  # no RNG state (nothing to reseed or thread through jit) without dropout
        model.dropout_rngs = nnx.Rngs(dropout=rngs.params())


def trainable_filter(model: CausalLM) -> Any:
    """nnx filter of what gets gradients and optimizer state: adapters (+ modules_to_save copies)
    when the model has LoRA, otherwise every ``nnx.Param``."""
    return nnx.LoRAParam if model.lora_config is not None else nnx.Param


def _adapter_tensors(model: CausalLM) -> list[tuple[str, Any, Any]]:
    """Every adapter tensor as (PEFT key, PEFT shape, variable, layer index or None,
    jaxpref->PEFT layout fn, (PEFT tensor, jaxpref shape)->jaxpref layout fn)."""
    out = []
    for path, lin in _lora_linears(model, model.lora_config.target_modules):
        in_flat, r = math.prod(lin.in_shape), model.lora_config.r
        for i in range(model.config.num_hidden_layers):
            base = _PEFT_PREFIX + hf_module_name(path, i)
            out.append(
                (
                    f"{base}.lora_A.weight",
                    (r, in_flat),
                    lin.lora_a,
                    i,
                    lambda a, n=in_flat: a.reshape(n, -1).T,
                    lambda t, s: t.T.reshape(s),
                )
            )
            out.append(
                (
                    f"{base}.lora_B.weight",
                    (math.prod(lin.out_shape), r),
                    lin.lora_b,
                    i,
                    lambda b, r=r: b.reshape(r, -1).T,
                    lambda t, s: t.T.reshape(s),
                )
            )
    copies = []
    if model.embed_tokens.embedding_copy is not None:
        copies.append(("model.embed_tokens.weight", model.embed_tokens.embedding_copy, False))
        if model.lm_head is None:
            copies.append(("lm_head.weight", model.embed_tokens.embedding_copy, False))
    if model.lm_head is not None and model.lm_head.kernel_copy is not None:
        copies.append(("lm_head.weight", model.lm_head.kernel_copy, True))
    for name, var, transpose in copies:
        v, h = var.shape if not transpose else var.shape[::-1]
        fwd = (lambda a: a.T) if transpose else (lambda a: a)
        out.append((_PEFT_PREFIX + name, (v, h), var, None, fwd, lambda t, s, tr=transpose: t.T if tr else t))
    return out


def export_peft_adapter(
    model: CausalLM,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    dtype: Any = None,
) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft.PeftModel`` loads.

    ``dtype``: tensor dtype on disk; None keeps each tensor's own (float32 adapters, ``modules_to_save``
    copies in the base's dtype), as PEFT's ``save_pretrained`` does.
    """
    cfg = model.lora_config
    if cfg is None:
        raise ModelError("export_peft_adapter: the model has no LoRA adapters")
    out_dir = os.fspath(out_dir)
    tensors = []
    for name, shape, var, layer, to_peft, _ in _adapter_tensors(model):

        def fetch(var=var, layer=layer, to_peft=to_peft) -> np.ndarray:
            value = var[...] if layer is None else var[...][layer]
            return to_peft(to_host(value))

        out_dtype = np.dtype(var.get_value().dtype if dtype is None else jnp.dtype(dtype))
        tensors.append((name, shape, out_dtype, fetch))
    tensors.sort(key=lambda t: hf_sort_key(t[0]))
    write_safetensors(tensors, out_dir, base="adapter_model", max_shard_size=2**62)
    if jax.process_index() == 0:
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": cfg.r,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "target_modules": list(cfg.target_modules),
            "modules_to_save": list(cfg.modules_to_save) or None,
            "ensure_weight_tying": bool(cfg.modules_to_save) and model.lm_head is None,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
            "inference_mode": True,
        }
        with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
            json.dump(config, f, indent=2)


def read_peft_config(adapter_dir: str | os.PathLike) -> LoraConfig:
    """LoraConfig from a PEFT ``adapter_config.json``; ModelError for PEFT features jaxpref lacks."""
    path = os.path.join(os.fspath(adapter_dir), ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise ModelError(f"{adapter_dir}: no {ADAPTER_CONFIG} (lora_model_dir must be a PEFT adapter directory)")
    with open(path) as f:
        d = json.load(f)
    if d.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{path}: peft_type={d.get('peft_type')!r} is not supported (only LORA)")
    for key in (
        "use_dora",
        "use_rslora",
        "fan_in_fan_out",
        "layers_to_transform",
        "rank_pattern",
        "alpha_pattern",
        "layer_replication",
        "target_parameters",
    ):
        if d.get(key):
            raise ModelError(f"{path}: {key}={d[key]!r} is not supported")
    if d.get("bias", "none") != "none":
        raise ModelError(f"{path}: bias={d['bias']!r} is not supported (only 'none')")
    targets = d.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        raise ModelError(f"{path}: target_modules as a regex ({targets!r}) is not supported; list module names")
    return LoraConfig(
        r=int(d["r"]),
        alpha=float(d.get("lora_alpha", 8)),
        dropout=float(d.get("lora_dropout", 0.0)),
        target_modules=resolve_target_modules(targets),
        modules_to_save=tuple(d.get("modules_to_save") or ()),
    )


def _normalise_peft_key(key: str) -> str:
    key = re.sub(r"\.(lora_[AB])\.default\.", r".\1.", key)
    return key.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")


def load_peft_adapter(
    model: CausalLM, adapter_dir: str | os.PathLike, *, mesh: Mesh | None = None, rules: Rules | None = None
) -> None:
    """Load a PEFT LoRA adapter into ``model`` in place (attaching LoRA first if it has none)."""
    cfg = read_peft_config(adapter_dir)
    if model.lora_config is None:
        apply_lora(model, cfg, rngs=nnx.Rngs(0), mesh=mesh, rules=rules)
    elif (model.lora_config.r, model.lora_config.target_modules) != (
        cfg.r,
        model_target_modules(model.config, cfg.target_modules),
    ):
        raise ModelError(
            f"{adapter_dir}: adapter (r={cfg.r}, targets={cfg.target_modules}) does not match the "
            f"model's LoRA (r={model.lora_config.r}, targets={model.lora_config.target_modules})"
        )
    weights = os.path.join(os.fspath(adapter_dir), ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise ModelError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}")
    reader = SafetensorsReader.for_file(weights)
    with reader:
        present = {_normalise_peft_key(k): k for k in sorted(reader.keys())}
        specs = _adapter_tensors(model)
        expected = {s[0] for s in specs}
        missing, unexpected = sorted(expected - set(present)), sorted(set(present) - expected)
        if missing or unexpected:
            raise ModelError(
                f"{adapter_dir}: adapter tensors do not match the model (missing: {missing[:20]}; "
                f"unexpected: {unexpected[:20]})"
            )
        by_var: dict[int, list] = {}
        for name, shape, var, layer, _, from_peft in specs:
            by_var.setdefault(id(var), [var, []])[1].append((name, shape, layer, from_peft))
        for var, items in by_var.values():
            host = np.empty(var.shape, dtype=np.dtype(var.get_value().dtype))
            for name, shape, layer, from_peft in items:
                t = reader.get(present[name])
                if tuple(t.shape) != shape:
                    raise ModelError(f"{adapter_dir}: {name} has shape {tuple(t.shape)}, expected {shape}")
                if layer is None:
                    host[...] = from_peft(t, host.shape)
                else:
                    host[layer] = from_peft(t, host.shape[1:])
            var.set_value(place(host, var, mesh, rules))


def merge_lora(model: CausalLM) -> CausalLM:
    """A new model without adapters whose weights are ``W + alpha / r * A B`` (and the
    modules_to_save copies in place of the originals); ``save_pretrained`` can write it.

    A QLoRA base is dequantized (float32, as bitsandbytes' ``dequantize_4bit``), the float32 delta added and
    the sum rounded once to ``param_dtype``: the merged model is the dequantized base plus the adapters, not
    the original full-precision weights plus the adapters (PEFT's ``merge_and_unload`` on a 4-bit base
    does the same)."""
    if model.lora_config is None:
        raise ModelError("merge_lora: the model has no LoRA adapters")
    merged = abstract_model(model.config, **model.construction_kwargs())
    src = dict(iter_modules(model))
    for path, var in nnx.iter_graph(merged):
        if not isinstance(var, nnx.Variable):
            continue
        *mod_path, name = (str(p) for p in path)
        orig = src[tuple(mod_path)]
        out_dtype = var.get_value().dtype
        if isinstance(orig, Linear) and name == "kernel" and orig.nf4_codes is not None:
            # float32 when the delta follows: one rounding, of the sum
            value = dequantized_kernel(orig, jnp.float32 if orig.lora_a is not None else out_dtype)
        elif isinstance(orig, NF4Table) and orig.nf4_codes is not None:
            # an NF4 embedding / LM head (qlora_quantize_embeddings), stored [V, H]; the LM head's kernel is [H, V]
            table = orig.dequantized(out_dtype)
            value = table if name == "embedding" else table.T
        else:
            value = getattr(orig, name)[...]
        if isinstance(orig, Linear) and name == "kernel" and orig.lora_a is not None:
            a, b = orig.lora_a[...].astype(jnp.float32), orig.lora_b[...].astype(jnp.float32)
            n_layers, r = a.shape[0], a.shape[-1]
            delta = jnp.matmul(a.reshape(n_layers, -1, r), b.reshape(n_layers, r, -1)) * orig.lora_scaling
            value = (value.astype(jnp.float32) + delta.reshape(value.shape)).astype(out_dtype)
        elif name == "embedding" and orig.embedding_copy is not None:
            value = orig.embedding_copy[...]
        elif name == "kernel" and getattr(orig, "kernel_copy", None) is not None:
            value = orig.kernel_copy[...]
        var.set_value(jnp.copy(value))
    return merged
