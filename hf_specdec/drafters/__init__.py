from .base import DecodingState, Drafter, TreeConfig
from .model import ModelDrafter
from .ngram import NGramDrafter

__all__ = ["DecodingState", "Drafter", "ModelDrafter", "NGramDrafter", "TreeConfig"]
