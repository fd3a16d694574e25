"""gti: Grounded Token Initialization for LM-based generative recommendation (arXiv 2604.02324)."""

__version__ = "0.1.0"
