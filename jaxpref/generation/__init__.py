"""Text generation with a KV cache: prefill + one compiled decode loop (``jax.lax.while_loop``)."""

from jaxpref.generation.sampler import (
    GenerationResult,
    SamplingSettings,
    generate,
    sample_logits,
    top_k_filter,
    top_p_filter,
)

__all__ = ["GenerationResult", "SamplingSettings", "generate", "sample_logits", "top_k_filter", "top_p_filter"]
