"""jaxllm: a JAX-native trainer for every stage of a language model's life. Layers, bottom up:
config/errors, core/ and data/, train/, rl/, objectives/, app/ (docs/architecture.md)."""

__version__ = "0.1.0"
