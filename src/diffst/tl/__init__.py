"""Tools: train Diff-ST, super-resolve, evaluate."""

from ._model import DiffST
from ._train import train

__all__ = ["DiffST", "train"]
