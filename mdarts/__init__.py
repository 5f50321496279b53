"""mdarts: memory-efficient differentiable architecture search for Transformers (see DESIGN.md)."""

__version__ = "0.1.0"
