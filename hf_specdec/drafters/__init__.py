from .base import DecodingState, Drafter, TreeConfig
from .loading import drafter_kind, lab_checkpoints, load_drafter, load_drafter_model
from .model import ModelDrafter
from .ngram import NGramDrafter
from .routed import RoutedDrafter
from .sorted import SortedDrafter

__all__ = ["DecodingState", "Drafter", "ModelDrafter", "NGramDrafter", "RoutedDrafter", "SortedDrafter", "TreeConfig", "drafter_kind", "lab_checkpoints", "load_drafter",
           "load_drafter_model"]
