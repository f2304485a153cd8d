"""Model configuration parsed from a Hugging Face ``config.json``.

Only architectures whose numerics jaxpref reproduces exactly are accepted; every other feature is a
``ModelError`` naming the config field, so an unsupported checkpoint never trains with silently wrong
math.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from jaxpref.errors import ModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")
GEMMA_MODEL_TYPES = ("gemma2", "gemma3_text")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
#: Phi-3's RoPE types ("su" and "yarn" are old spellings transformers reads as "longrope").
PHI3_ROPE_TYPES = ("default", "longrope")

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}

#: transformers' Phi3Config default of ``original_max_position_embeddings`` (it wins over the value
#: inside ``rope_parameters``; see ``_parse_phi3_rope``).
PHI3_ORIGINAL_MAX_POSITIONS = 4096

# MLP activations: config.json name -> what ``jaxpref.models.layers.MLP`` computes on the gate.
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")

# transformers' class defaults of the Gemma configs for fields a config.json may leave out (hub
# checkpoints written by older transformers omit some, e.g. gemma-2-2b has no tie_word_embeddings).
_GEMMA_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": dict(
        head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, tie_word_embeddings=True,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
    ),
    "gemma3_text": dict(
        head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, tie_word_embeddings=True,
        final_logit_softcapping=None, hidden_activation="gelu_pytorch_tanh",
    ),
}  # fmt: skip
_GEMMA3_ROPE_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
_GEMMA3_SLIDING_WINDOW_PATTERN = 6

# Fields that, when set to a truthy value, mean a mixture-of-experts model.
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")

_ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclasses.dataclass(frozen=True)
class AttentionKind:
    """One kind of attention layer: ``window`` keys visible per query (None: all earlier ones) and
    ``rope``, an index into ``ModelConfig.rope_variants``."""

    window: int | None
    rope: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of a Llama-family decoder.

    ``rope_scaling`` is ``None`` for plain RoPE, otherwise a dict with ``rope_type`` ("linear" or
    "llama3") and that type's parameters.

    Attention variants: ``layer_types`` names each layer "full_attention" or "sliding_attention"
    (empty: all full); sliding layers see the last ``sliding_window`` keys, themselves included (key
    j is visible from query i when ``i - sliding_window < j <= i``, transformers' overlay). Sliding
    layers rotate with ``local_rope_theta`` / ``local_rope_scaling`` when set (Gemma 3), else with
    the global RoPE. Scores are scaled by ``query_pre_attn_scalar ** -0.5`` (default head_dim) and
    soft-capped as ``c * tanh(s / c)`` with ``c = attn_logit_softcapping``;
    ``final_logit_softcapping`` caps the LM-head logits the same way.

    Gemma 2/3 (``GEMMA_MODEL_TYPES``) differ from the Llama family in ways derived from
    ``model_type``: RMSNorm weights stored as offsets (``x_hat * (1 + w)``, ``rms_norm_unit_offset``),
    "sandwich" norms around attention and MLP (``sandwich_norms``), embeddings scaled by
    sqrt(hidden_size) (``embed_scale``); ``hidden_act`` names the MLP activation.

    ``partial_rotary_factor`` (Phi-3/Phi-4-mini): RoPE rotates only the first ``rotary_dim`` dims of
    each head and passes the rest through. ``rope_scaling`` of type "longrope" (Phi-3) holds
    ``short_factor`` / ``long_factor`` (``rotary_dim // 2`` each), ``original_max_position_embeddings``
    and the resolved ``attention_factor`` (see ``jaxpref.models.rope.longrope_inverse_frequencies``).
    ``fused_projections`` (Phi-3): q/k/v are one ``qkv_proj`` and gate/up one ``gate_up_proj``, as in
    the checkpoint.

    ``attention_bias`` means bias on q/k/v (and on o_proj too except for Qwen2, see ``o_proj_bias``).
    ``hf_config`` keeps the original ``config.json`` content so that saving writes back every field
    jaxpref does not interpret.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    max_position_embeddings: int
    initializer_range: float
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    # Attention variants (defaults: the Llama family's plain causal attention).
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    local_rope_theta: float | None = None
    local_rope_scaling: dict | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    hidden_act: str = "silu"
    partial_rotary_factor: float = 1.0

    def __hash__(self) -> int:
        # Models keep their config as a static attribute, which NNX/jit need hashable.
        fields = [getattr(self, f.name) for f in dataclasses.fields(self) if f.compare]
        return hash(json.dumps(fields, sort_keys=True, default=str))

    @property
    def o_proj_bias(self) -> bool:
        """Whether o_proj has a bias (Qwen2 puts bias on q/k/v only)."""
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def rms_norm_unit_offset(self) -> bool:
        """Whether RMSNorm weights are offsets from 1 (Gemma: ``x_hat * (1 + w)`` in float32, zero init)."""
        return self.model_type in GEMMA_MODEL_TYPES

    @property
    def sandwich_norms(self) -> bool:
        """Whether blocks normalise the attention and MLP outputs too (Gemma: ``post_attention_layernorm``
        on the attention output, ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` around
        the MLP); otherwise ``post_attention_layernorm`` is the MLP's input norm (Llama)."""
        return self.model_type in GEMMA_MODEL_TYPES

    @property
    def embed_scale(self) -> float | None:
        """Factor on the token embeddings (Gemma: sqrt(hidden_size), rounded to the compute dtype), or None."""
        return self.hidden_size**0.5 if self.model_type in GEMMA_MODEL_TYPES else None

    @property
    def fused_projections(self) -> bool:
        """Whether q/k/v and gate/up are fused projections (``qkv_proj``, ``gate_up_proj``), as Phi-3 stores them."""
        return self.model_type == "phi3"

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (the first ones): ``int(head_dim * partial_rotary_factor)``."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_scale(self) -> float:
        """The factor on q.k scores: ``query_pre_attn_scalar ** -0.5``, by default ``head_dim ** -0.5``."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def rope_variants(self) -> tuple[tuple[float, dict | None], ...]:
        """(theta, scaling) of each RoPE in use: the global one first, then the sliding layers' own."""
        variants = [(self.rope_theta, self.rope_scaling)]
        if self.local_rope_theta is not None and "sliding_attention" in self.layer_types:
            variants.append((self.local_rope_theta, self.local_rope_scaling))
        return tuple(variants)

    @property
    def attention_kinds(self) -> tuple[AttentionKind, ...]:
        """The distinct kinds of attention layer, in order of first appearance (at least one)."""
        kinds: list[AttentionKind] = []
        for i in range(self.num_hidden_layers):
            kind = self.layer_attention(i)
            if kind not in kinds:
                kinds.append(kind)
        return tuple(kinds)

    @property
    def layer_kind_ids(self) -> tuple[int, ...]:
        """Per layer, its index into ``attention_kinds``."""
        kinds = self.attention_kinds
        return tuple(kinds.index(self.layer_attention(i)) for i in range(self.num_hidden_layers))

    def layer_attention(self, i: int) -> AttentionKind:
        """Layer i's attention: its window (None: every earlier key) and RoPE (index into ``rope_variants``)."""
        sliding = bool(self.layer_types) and self.layer_types[i] == "sliding_attention"
        if not sliding or self.sliding_window is None:
            return AttentionKind(window=None, rope=0)
        return AttentionKind(window=self.sliding_window, rope=len(self.rope_variants) - 1)

    @property
    def pad_token_id(self) -> int | None:
        pad = self.hf_config.get("pad_token_id")
        return pad if isinstance(pad, int) and 0 <= pad < self.vocab_size else None

    @classmethod
    def from_hf_dict(cls, d: dict) -> ModelConfig:
        """Parse a ``config.json`` dict; ``ModelError`` names any field jaxpref does not implement."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelError(
                f"config.json model_type={model_type!r} is not supported; jaxpref implements "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        hf_config = copy.deepcopy(d)
        d = {**_GEMMA_DEFAULTS.get(model_type, {}), **d}
        _check_unsupported(d, model_type)
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if not isinstance(d.get(key), int):
                raise ModelError(f"config.json field {key!r} is missing or not an integer")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ModelError(
                f"config.json num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        partial_rotary_factor = 1.0
        if model_type == "phi3":
            rope_theta, rope_scaling, partial_rotary_factor = _parse_phi3_rope(d, int(head_dim))
        elif model_type == "gemma3_text":
            rope_theta, rope_scaling = _gemma3_rope(d, "full_attention")
        else:
            rope_theta, rope_scaling = _parse_rope(d)
        if model_type == "qwen2":
            attention_bias = True
        elif model_type in ("mistral", "phi3"):
            attention_bias = False
        else:
            attention_bias = bool(d.get("attention_bias", False))
        layer_types, window = _attention_layers(d, model_type)
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            initializer_range=float(d.get("initializer_range", 0.02)),
            hf_config=hf_config,
            layer_types=layer_types,
            sliding_window=window,
            partial_rotary_factor=partial_rotary_factor,
            hidden_act=_activation(d, model_type),
            **_gemma_fields(d, model_type),
        )

    def to_hf_dict(self) -> dict:
        """The ``config.json`` content: the original dict with jaxpref's fields written over it."""
        d = copy.deepcopy(self.hf_config)
        d.update(
            model_type=self.model_type,
            architectures=[ARCHITECTURES[self.model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range,
        )
        if self.model_type in ("llama", "qwen3", *GEMMA_MODEL_TYPES):
            d["attention_bias"] = self.attention_bias
        if self.model_type in GEMMA_MODEL_TYPES:
            self._write_gemma_fields(d)
            if self.model_type == "gemma3_text":
                return d
        else:
            d["hidden_act"] = self.hidden_act
        # Write RoPE in the spelling the original used; transformers 5 reads both.
        if "rope_parameters" in d or ("rope_theta" not in d and "rope_scaling" not in d):
            d.pop("rope_theta", None)
            d.pop("rope_scaling", None)
            d["rope_parameters"] = {
                "rope_type": "default",
                **(self.rope_scaling or {}),
                "rope_theta": self.rope_theta,
            }
        else:
            d["rope_theta"] = self.rope_theta
            d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        if self.model_type == "phi3":
            _phi3_rope_to_hf(self, d)
        return d

    def _write_gemma_fields(self, d: dict) -> None:
        """``to_hf_dict``'s Gemma fields into d; Gemma 3's RoPE per layer type (in the original's spelling)."""
        d.update(
            hidden_activation=self.hidden_act,
            query_pre_attn_scalar=_int_if_integral(self.query_pre_attn_scalar),  # transformers types it int
            final_logit_softcapping=self.final_logit_softcapping,
            layer_types=list(self.layer_types or ["full_attention"] * self.num_hidden_layers),
            sliding_window=self.sliding_window if self.layer_types else d.get("sliding_window"),
        )
        if self.model_type == "gemma2":
            d["attn_logit_softcapping"] = self.attn_logit_softcapping
            return
        local_theta = self.local_rope_theta
        if local_theta is None:
            local_theta = _GEMMA3_ROPE_THETA["sliding_attention"]
        legacy = {"rope_theta", "rope_scaling", "rope_local_base_freq"} & set(d)
        if "rope_parameters" in d or not legacy or self.local_rope_scaling:  # (the legacy keys cannot say that)
            for key in ("rope_theta", "rope_scaling", "rope_local_base_freq"):
                d.pop(key, None)
            full = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
            sliding = {"rope_type": "default", **(self.local_rope_scaling or {}), "rope_theta": local_theta}
            d["rope_parameters"] = {"full_attention": full, "sliding_attention": sliding}
        else:
            d.update(
                rope_theta=self.rope_theta,
                rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None,
                rope_local_base_freq=local_theta,
            )


def _activation(d: dict, model_type: str) -> str:
    """The MLP activation: Gemma's ``hidden_activation`` (transformers ignores its ``hidden_act``),
    else ``hidden_act``."""
    key = "hidden_activation" if model_type in GEMMA_MODEL_TYPES else "hidden_act"
    return d.get(key, "silu")


def _check_unsupported(d: dict, model_type: str) -> None:
    act = _activation(d, model_type)
    if act not in ACTIVATIONS:
        key = "hidden_activation" if model_type in GEMMA_MODEL_TYPES else "hidden_act"
        raise ModelError(f"config.json {key}={act!r} is not supported; jaxpref implements {', '.join(ACTIVATIONS)}")
    if d.get("mlp_bias"):
        raise ModelError("config.json mlp_bias=true is not supported (MLP projections without bias only)")
    for key in _MOE_FIELDS:
        if d.get(key):
            raise ModelError(f"config.json {key}={d[key]!r}: mixture-of-experts models are not supported")
    prf = d.get("partial_rotary_factor", 1.0)
    if prf not in (None, 1, 1.0) and model_type != "phi3":
        raise ModelError(f"config.json partial_rotary_factor={prf} is not supported (only 1.0)")


LAYER_TYPES = ("full_attention", "sliding_attention")


def _attention_layers(d: dict, model_type: str) -> tuple[tuple[str, ...], int | None]:
    """(layer_types, sliding_window) as transformers reads them for ``model_type``.

    Mistral slides every layer when ``sliding_window`` is set; Qwen2/3 only with
    ``use_sliding_window``, on the layers ``layer_types`` names (default: from ``max_window_layers``
    on); Llama has no windows.
    """
    n = d["num_hidden_layers"]
    given = d.get("layer_types")
    if given is not None:
        if not isinstance(given, list) or len(given) != n:
            raise ModelError(f"config.json layer_types must list one type per layer ({n}), got {given!r}")
        unknown = sorted({t for t in given if t not in LAYER_TYPES})
        if unknown:
            raise ModelError(f"config.json layer_types contains {unknown}: jaxpref implements {list(LAYER_TYPES)}")
    window = d.get("sliding_window")
    if model_type == "mistral":
        types = ["sliding_attention"] * n if window is not None else ["full_attention"] * n
    elif model_type in ("qwen2", "qwen3"):
        if not d.get("use_sliding_window") or window is None:
            return (), None
        first = d.get("max_window_layers", 28)
        types = given or ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    elif model_type == "phi3":
        # transformers' Phi3 masks every layer with sliding_window when it is set (Phi-3-mini-4k: 2047).
        types = ["sliding_attention"] * n if window is not None else ["full_attention"] * n
    elif model_type == "llama":
        return (), None
    elif model_type == "gemma2":  # alternating, sliding first
        types = given or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    elif model_type == "gemma3_text":  # every pattern-th layer full, the others sliding
        pattern = d.get("sliding_window_pattern", d.get("_sliding_window_pattern", _GEMMA3_SLIDING_WINDOW_PATTERN))
        if not isinstance(pattern, int) or pattern < 1:
            raise ModelError(f"config.json sliding_window_pattern={pattern!r} must be a positive integer")
        types = given or ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    else:
        types = given or []
    if "sliding_attention" not in types:
        return (), None
    if not isinstance(window, int) or window < 1:
        raise ModelError(f"config.json sliding_window={window!r} must be a positive integer for sliding layers")
    return tuple(types), window


def _gemma_fields(d: dict, model_type: str) -> dict[str, Any]:
    """``ModelConfig`` fields only Gemma configs set: the attention scale, soft-caps, Gemma 3's local RoPE."""
    if model_type not in GEMMA_MODEL_TYPES:
        return {}
    if d.get("use_bidirectional_attention"):
        raise ModelError(
            "config.json use_bidirectional_attention=true (an encoder such as EmbeddingGemma) is not "
            "supported: jaxpref implements causal decoders; use a causal Gemma checkpoint"
        )
    fields = {
        "query_pre_attn_scalar": _positive(d, "query_pre_attn_scalar", required=True),
        "final_logit_softcapping": _positive(d, "final_logit_softcapping"),
    }
    if model_type == "gemma2":
        fields["attn_logit_softcapping"] = _positive(d, "attn_logit_softcapping")
    else:  # Gemma 3 keeps attn_logit_softcapping in its config, but transformers' Gemma3Attention never applies it
        fields["local_rope_theta"], fields["local_rope_scaling"] = _gemma3_rope(d, "sliding_attention")
    return fields


def _positive(d: dict, key: str, *, required: bool = False) -> float | None:
    value = d.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ModelError(f"config.json {key}={value!r} must be a positive number{'' if required else ' or null'}")
    return float(value)


def _int_if_integral(x: float | None) -> float | int | None:
    return int(x) if x is not None and float(x).is_integer() else x


def _gemma3_rope(d: dict, layer_type: str) -> tuple[float, dict | None]:
    """Gemma 3's RoPE for ``layer_type``, as transformers' Gemma3TextConfig reads it: ``rope_parameters``
    nested per layer type (transformers 5), or the legacy ``rope_theta`` + ``rope_scaling`` (global
    layers only) and ``rope_local_base_freq`` (sliding layers)."""
    params = d.get("rope_parameters") or {}
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise ModelError(
            f"config.json rope_parameters={params!r}: a gemma3_text config nests them per layer type "
            "({full_attention: {...}, sliding_attention: {...}}) or uses rope_theta / rope_scaling / "
            "rope_local_base_freq"
        )
    unknown = sorted(set(params) - set(LAYER_TYPES))
    if unknown:
        raise ModelError(f"config.json rope_parameters has {unknown}: jaxpref implements {list(LAYER_TYPES)}")
    sub = dict(params.get(layer_type) or {"rope_type": "default"})
    if layer_type == "full_attention" and d.get("rope_scaling"):
        sub.update(d["rope_scaling"])
    legacy = "rope_theta" if layer_type == "full_attention" else "rope_local_base_freq"
    sub.setdefault("rope_theta", d.get(legacy) or _GEMMA3_ROPE_THETA[layer_type])
    return _parse_rope({"rope_parameters": sub, "max_position_embeddings": d.get("max_position_embeddings")})


def _parse_rope(d: dict) -> tuple[float, dict | None]:
    """Read RoPE from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``."""
    params = d.get("rope_parameters")
    field = "rope_parameters"
    if not params:
        params = d.get("rope_scaling") or {}
        field = "rope_scaling"
    if not isinstance(params, dict):
        raise ModelError(f"config.json {field} must be a mapping, got {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ModelError(f"config.json {field} is nested per layer type; only one global RoPE is supported")
    params = dict(params)
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = d.get("rope_theta", 10000.0)
    prf = params.pop("partial_rotary_factor", 1.0)
    if prf not in (None, 1, 1.0):
        raise ModelError(f"config.json {field}.partial_rotary_factor={prf} is not supported (only 1.0)")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelError(
            f"config.json {field}.rope_type={rope_type!r} is not supported; jaxpref implements "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return float(theta), None
    scaling: dict[str, Any] = {"rope_type": rope_type}
    for key in _ROPE_SCALING_KEYS[rope_type]:
        value = params.get(key)
        if key == "original_max_position_embeddings" and value is None:
            value = d.get("original_max_position_embeddings", d.get("max_position_embeddings"))
        if value is None:
            raise ModelError(f"config.json {field}.{key} is required for rope_type={rope_type!r}")
        scaling[key] = value
    return float(theta), scaling


def _parse_phi3_rope(d: dict, head_dim: int) -> tuple[float, dict | None, float]:
    """(rope_theta, rope_scaling, partial_rotary_factor) as transformers' Phi3Config reads them.

    RoPE comes from ``rope_parameters`` or ``rope_scaling`` (types "default" and "longrope"; "su" and
    "yarn" mean "longrope"); ``partial_rotary_factor`` from there or the top level. For longrope,
    ``original_max_position_embeddings`` is the top-level field (default 4096), which transformers
    puts over any value inside the RoPE dict, and ``attention_factor`` defaults to
    ``sqrt(1 + log(factor) / log(original_max))`` with ``factor = max_position_embeddings /
    original_max`` unless ``factor`` is given (1 when ``factor <= 1``).
    """
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    field = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    if not isinstance(params, dict) or (params and all(isinstance(v, dict) for v in params.values())):
        raise ModelError(f"config.json {field} must be one mapping (Phi-3 has one global RoPE), got {params!r}")
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    prf = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    prf = 1.0 if prf is None else float(prf)
    if not 0.0 < prf <= 1.0:
        raise ModelError(f"config.json partial_rotary_factor={prf} must be in (0, 1]")
    rotary_dim = int(head_dim * prf)
    if rotary_dim < 2 or rotary_dim % 2:
        raise ModelError(f"config.json partial_rotary_factor={prf} gives an odd or empty rotary dim {rotary_dim}")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    rope_type = "longrope" if rope_type in ("su", "yarn") else rope_type
    if rope_type not in PHI3_ROPE_TYPES:
        raise ModelError(
            f"config.json {field}.rope_type={rope_type!r} is not supported for phi3; jaxpref implements "
            f"{', '.join(PHI3_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None, prf
    original = d.get("original_max_position_embeddings", PHI3_ORIGINAL_MAX_POSITIONS)
    scaling: dict[str, Any] = {"rope_type": "longrope", "original_max_position_embeddings": int(original)}
    for key in ("short_factor", "long_factor"):
        value = params.get(key)
        if not (isinstance(value, list) and len(value) == rotary_dim // 2):
            raise ModelError(
                f"config.json {field}.{key} must list {rotary_dim // 2} numbers (rotary dim {rotary_dim} / 2), "
                f"got {value!r}"
            )
        scaling[key] = [float(x) for x in value]
    factor = params.get("factor")
    if factor is None:
        factor = d.get("max_position_embeddings", PHI3_ORIGINAL_MAX_POSITIONS) / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    scaling["attention_factor"] = float(attention_factor)
    return theta, scaling, prf


def _phi3_rope_to_hf(config: ModelConfig, d: dict) -> None:
    """Phi-3's RoPE fields in ``d`` (``to_hf_dict``), so that transformers reads back the same RoPE.

    The resolved ``attention_factor`` stays in the RoPE dict (transformers then uses it as is), and
    ``original_max_position_embeddings`` goes to the top level, where transformers' Phi3Config reads it.
    """
    key = "rope_parameters" if "rope_parameters" in d else "rope_scaling"
    if config.rope_scaling is not None:
        d["original_max_position_embeddings"] = config.rope_scaling["original_max_position_embeddings"]
    if key == "rope_parameters":
        d[key]["partial_rotary_factor"] = config.partial_rotary_factor
    if "partial_rotary_factor" in d or config.partial_rotary_factor != 1.0:
        d["partial_rotary_factor"] = config.partial_rotary_factor


def load_model_config(path_or_repo_id: str | os.PathLike) -> ModelConfig:
    """Read ``config.json`` from a local directory (or a hub id, downloaded with huggingface_hub)."""
    path = resolve_checkpoint_dir(path_or_repo_id, patterns=("config.json",))
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelError(f"{path_or_repo_id}: no config.json found in {path}")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{cfg_path}: cannot read config.json ({e})") from e
    return ModelConfig.from_hf_dict(d)


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
