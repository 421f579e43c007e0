"""megakor: continued pretraining of open LLaMA-class checkpoints on Korean, under DeepSpeed."""

__version__ = "0.1.0"
