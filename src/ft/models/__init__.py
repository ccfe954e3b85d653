"""Models: the built-in catalog, GGUF import, Hugging Face pulls, loading with the CPU precision policy."""

import os

# transformers prints an advisory about missing PyTorch on import; ft never uses torch.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
