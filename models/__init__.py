"""Model definitions (single-device PyTorch) and, as data, how each is split."""

from models.llama import ModelArgs, Transformer, num_params

__all__ = ["ModelArgs", "Transformer", "num_params"]
