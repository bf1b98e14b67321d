"""Circuit analysis of transformer language models: hook-based and weight-based methods side by side."""

__version__ = "0.1.0"
