"""Tools: train Diff-ST, super-resolve, evaluate."""

from ._baselines import tesla, upsample
from ._evaluate import evaluate, evaluate_spots
from ._model import DiffST
from ._run import Interrupted
from ._super_resolve import super_resolve
from ._train import train

__all__ = ["DiffST", "Interrupted", "evaluate", "evaluate_spots", "super_resolve", "tesla", "train", "upsample"]
