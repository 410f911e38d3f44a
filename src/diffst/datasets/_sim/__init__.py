"""A seeded breast-carcinoma-like tissue section, shared by the synthetic Xenium, Visium and Visium HD datasets.

Everything here is plain numpy/scipy in physical units (µm, origin at the top-left corner of the field, x to the
right, y down) and knows nothing about SpatialData:

- :func:`simulate_tissue` draws the tissue: its outline, five spatial domains with structures from ~10 µm to ~1 mm
  (tumour nests and cords, stroma, immune aggregates, vessels, normal glands), the cells (position, type, nucleus
  and cytoplasm morphology) and per-cell latent programme activities.
- :func:`gene_panel` builds a gene panel (real marker symbols) with per-type programmes, co-expression modules,
  spatial gradients and housekeeping genes; :func:`simulate_transcripts` draws the molecules of that panel in the
  cells (and, for Xenium, background molecules and control probes).
- :func:`capture_spots` and :func:`capture_bins` model sequencing-based capture (Visium spots, Visium HD bins) of the
  same molecules; :func:`render` paints H&E and DAPI pixels of any window at any resolution, deterministically.

The same ``seed`` and field size always give the same tissue, whatever the gene panel or the assay, so a synthetic
Xenium slide is the ground truth of the synthetic Visium slide with the same seed.
"""

from ._common import CELL_TYPES, DOMAINS, GLAND, IMMUNE, MODULES, TUM, TUMOUR, VESSEL
from .capture import BinGrid, SpotLattice, Transcripts, capture_bins, capture_spots, simulate_transcripts, spot_lattice
from .panel import CONTROL_PREFIXES, GenePanel, default_transcripts_per_cell, gene_panel
from .render import render
from .tissue import Tissue, simulate_tissue

__all__ = [
    "CELL_TYPES",
    "CONTROL_PREFIXES",
    "DOMAINS",
    "GLAND",
    "IMMUNE",
    "MODULES",
    "TUM",
    "TUMOUR",
    "VESSEL",
    "GenePanel",
    "Tissue",
    "BinGrid",
    "SpotLattice",
    "Transcripts",
    "capture_bins",
    "capture_spots",
    "default_transcripts_per_cell",
    "gene_panel",
    "render",
    "simulate_tissue",
    "simulate_transcripts",
    "spot_lattice",
]
