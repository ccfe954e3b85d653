"""ft: fine-tune open LLMs on your own machine with LoRA on MLX."""

__version__ = "0.1.0"
