"""mdarts: memory-efficient differentiable architecture search for Transformers (see docs/design.md)."""

__version__ = "0.1.0"
