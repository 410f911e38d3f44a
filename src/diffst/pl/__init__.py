"""Plots: super-resolved gene maps over the tissue, training curves, benchmark comparisons."""

from ._benchmark import benchmark
from ._gene_maps import gene_maps
from ._training import training_history

__all__ = ["benchmark", "gene_maps", "training_history"]
