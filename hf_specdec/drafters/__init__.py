from .base import DecodingState, Drafter, TreeConfig
from .model import ModelDrafter
from .ngram import NGramDrafter
from .sorted import SortedDrafter

__all__ = ["DecodingState", "Drafter", "ModelDrafter", "NGramDrafter", "SortedDrafter", "TreeConfig"]
