"""Flax NNX Llama-family decoder and Hugging Face checkpoint interop.

``from_pretrained`` / ``from_config`` build a ``CausalLM``; ``save_pretrained`` writes a checkpoint
that transformers loads. See docs/design.md (Models) for the contract.
"""

from jaxpref.models import nf4
from jaxpref.models.attention import attention
from jaxpref.models.config import ModelConfig, load_model_config
from jaxpref.models.decoder import REMAT_POLICIES, CausalLM
from jaxpref.models.hf_io import from_config, from_pretrained, save_pretrained
from jaxpref.sharding import DEFAULT_RULES, logical_to_spec, shard_module, state_shardings

__all__ = [
    "DEFAULT_RULES",
    "REMAT_POLICIES",
    "CausalLM",
    "ModelConfig",
    "attention",
    "from_config",
    "from_pretrained",
    "load_model_config",
    "logical_to_spec",
    "nf4",
    "save_pretrained",
    "shard_module",
    "state_shardings",
]
