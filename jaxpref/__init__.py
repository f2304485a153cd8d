"""jaxpref: knowledge distillation and preference optimization for causal LMs in JAX/Flax."""

__version__ = "0.1.0"
