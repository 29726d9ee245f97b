"""stackfast: pre-train Llama-style language models by depthwise growth (G_stack)."""

__version__ = "0.1.0"
