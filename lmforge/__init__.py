"""lmforge: make, run and understand language models, in readable PyTorch."""

__version__ = "0.1.0"
