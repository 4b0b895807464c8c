from .base import DecodingState, Drafter, TreeConfig
from .eagle3 import Eagle3Drafter
from .loading import drafter_kind, lab_checkpoints, load_drafter, load_drafter_model
from .model import ModelDrafter
from .ngram import NGramDrafter
from .routed import RoutedDrafter
from .sorted import SortedDrafter

__all__ = ["DecodingState", "Drafter", "Eagle3Drafter", "ModelDrafter", "NGramDrafter", "RoutedDrafter", "SortedDrafter", "TreeConfig", "drafter_kind", "lab_checkpoints", "load_drafter",
           "load_drafter_model"]
