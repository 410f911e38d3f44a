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

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
from scipy import ndimage, sparse
from scipy.spatial import cKDTree

__all__ = [
    "CELL_TYPES",
    "CONTROL_PREFIXES",
    "DOMAINS",
    "MODULES",
    "GenePanel",
    "Tissue",
    "Transcripts",
    "capture_bins",
    "capture_spots",
    "default_transcripts_per_cell",
    "gene_panel",
    "render",
    "simulate_tissue",
    "simulate_transcripts",
]

GRID_UM = 2.0
"""Resolution of the label grids (domains, lumens, tissue mask); also the finest Visium HD bin."""

DOMAINS = ("stroma", "tumour", "immune", "vessel", "gland")
STROMA, TUMOUR, IMMUNE, VESSEL, GLAND = range(5)

CELL_TYPES = (
    "tumour_epithelial",
    "normal_epithelial",
    "fibroblast",
    "T_cell",
    "B_cell",
    "macrophage",
    "endothelial",
    "adipocyte",
)
TUM, EPI, FIB, TC, BC, MAC, ENDO, ADIP = range(8)
_ABBREV = {"tum": TUM, "epi": EPI, "fib": FIB, "T": TC, "B": BC, "mac": MAC, "endo": ENDO, "adip": ADIP}

# Per-type morphology and assay behaviour. Lengths in µm; H, E are stain optical densities (Beer-Lambert), dapi a
# fraction of the uint16 range; rna scales the cell's mRNA content; p_nuc is the share of its molecules in the nucleus.
_MORPH_COLUMNS = (
    "nuc_a",
    "nuc_ratio",
    "nuc_sd",
    "H",
    "tex",
    "cell_r",
    "cell_ratio",
    "E",
    "Hc",
    "dapi",
    "rna",
    "p_nuc",
    "opacity",
)
_MORPH = np.array(
    [
        # nuc_a ratio  sd    H     tex   cell_r ratio  E     Hc    dapi  rna   p_nuc opacity
        [4.4, 0.78, 0.16, 0.90, 0.60, 8.0, 0.85, 0.44, 0.10, 0.30, 1.45, 0.30, 1.0],  # tumour epithelial
        [3.9, 0.62, 0.10, 1.05, 0.35, 6.0, 0.80, 0.36, 0.06, 0.38, 1.10, 0.30, 1.0],  # normal epithelial
        [5.4, 0.32, 0.12, 1.20, 0.25, 6.5, 0.35, 0.52, 0.03, 0.42, 0.90, 0.35, 0.3],  # fibroblast
        [2.9, 0.92, 0.07, 1.60, 0.20, 3.8, 0.95, 0.22, 0.12, 0.58, 0.55, 0.40, 0.8],  # T cell
        [3.1, 0.90, 0.07, 1.50, 0.20, 4.1, 0.95, 0.26, 0.16, 0.54, 0.60, 0.40, 0.8],  # B cell
        [4.2, 0.68, 0.12, 0.80, 0.40, 9.0, 0.80, 0.62, 0.06, 0.30, 1.20, 0.25, 0.9],  # macrophage
        [5.0, 0.30, 0.10, 1.15, 0.25, 6.0, 0.35, 0.45, 0.04, 0.40, 0.80, 0.35, 0.4],  # endothelial
        [4.0, 0.30, 0.10, 1.00, 0.20, 22.0, 0.85, 0.02, 0.00, 0.35, 0.45, 0.20, 1.0],  # adipocyte
    ],
    dtype=np.float64,
)
_M = {name: _MORPH[:, i] for i, name in enumerate(_MORPH_COLUMNS)}

MODULES = (
    "prolif",
    "hypoxia",
    "ifn",
    "erbb2",
    "luminal",
    "basal",
    "contractile",
    "caf",
    "cytotoxic",
    "plasma",
    "antigen",
    "stress",
)
# How strongly each cell type expresses each co-expression module (rows: CELL_TYPES, columns: MODULES).
_GATES = np.array(
    [
        # prol hyp  ifn  erb  lum  bas  con  caf  cyt  pla  ant  str
        [1.0, 1.0, 0.8, 1.0, 1.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.3, 1.0],  # tumour epithelial
        [0.3, 0.3, 0.8, 0.0, 0.7, 1.0, 1.0, 0.0, 0.0, 0.0, 0.2, 1.0],  # normal epithelial
        [0.2, 0.4, 0.6, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.1, 1.0],  # fibroblast
        [0.5, 0.2, 1.2, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.3, 1.0],  # T cell
        [0.6, 0.2, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0],  # B cell
        [0.2, 0.7, 1.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0],  # macrophage
        [0.2, 0.4, 0.8, 0.0, 0.0, 0.0, 0.3, 0.0, 0.0, 0.0, 0.4, 1.0],  # endothelial
        [0.0, 0.2, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # adipocyte
    ]
)

# The gene catalogue, in panel order: the first 50 lines are the default panel (markers of every type, one or two
# genes of each module, housekeeping and gradient genes); the rest is interleaved by group (see `_catalogue`).
# Columns: symbol, per-type log fold changes ("-" none), module loadings ("-" none), flags (hk: housekeeping,
# grad: follows a tissue-wide spatial gradient).
_CATALOGUE = """
EPCAM tum:3.5,epi:3 - -
KRT8 tum:3.5,epi:3 - -
ERBB2 tum:2 erbb2:1.1 -
ESR1 tum:1.2,epi:1 luminal:1.2 -
MKI67 - prolif:1.3 -
PTPRC T:3.5,B:3.5,mac:3 - -
CD3E T:4 - -
MS4A1 B:4.2 - -
CD68 mac:4 - -
PECAM1 endo:4,mac:1 - -
COL1A1 fib:4.2 - -
LUM fib:3.8 - -
ACTA2 fib:1.5 contractile:1.3 -
ADIPOQ adip:4.5 - -
KRT5 epi:0.5 basal:1.5 -
CD8A T:1 cytotoxic:1.3 -
LYZ mac:4.2 - -
VWF endo:4.2 - -
DCN fib:4 - -
KRT18 tum:3.3,epi:3 - -
GRB7 tum:1.5 erbb2:1.2 -
PGR tum:0.5 luminal:1.4 -
TOP2A - prolif:1.4 -
CD79A B:4 - -
CD163 mac:3.8 - -
CDH5 endo:4 - -
PLIN1 adip:4.5 - -
KRT14 epi:0.5 basal:1.4 -
VEGFA tum:0.5 hypoxia:1.2 -
CA9 - hypoxia:1.6 -
CXCL10 mac:1 ifn:1.5 -
ISG15 - ifn:1.2 -
GZMB T:0.5 cytotoxic:1.4 -
CD4 T:2,mac:1.5 cytotoxic:-0.8 -
FOXA1 tum:1.5,epi:1 luminal:1 -
GATA3 tum:2,epi:1.5,T:1 luminal:0.6 -
KRT19 tum:3,epi:3 - -
COL1A2 fib:4 - -
POSTN fib:1.5 caf:1.5 -
PDGFRB fib:3,endo:1 contractile:0.6 -
MYH11 fib:0.3 contractile:1.6 -
KDR endo:3.8 - -
FABP4 adip:4,endo:2 - -
CD19 B:3.8 - -
C1QA mac:4.2 - -
SCGB2A2 tum:2.5 - grad
CEACAM6 tum:2.5 - grad
ACTB - - hk
GAPDH - - hk
CCND1 tum:2,epi:1 - -
KRT7 tum:3,epi:2.5 - -
CDH1 tum:3,epi:3 - -
CLDN4 tum:3,epi:2.5 - -
ELF3 tum:3,epi:2.5 - -
MUC1 tum:3,epi:2 - -
CD24 tum:3,epi:2.5 - -
AGR2 tum:3.2,epi:1 - -
TPD52 tum:3 - -
MLPH tum:2.5,epi:2 - -
SPDEF tum:3 - -
XBP1 tum:2.5,epi:1.5,B:1 plasma:1 -
ANKRD30A tum:3 - -
MYC tum:2 - -
TACSTD2 tum:3,epi:3 - -
KRT23 tum:3 - -
S100A14 tum:3,epi:2.5 - -
MUCL1 tum:3 - grad
TFAP2A tum:2.5,epi:2 - -
TFAP2C tum:2.5 - -
FASN tum:2.5,adip:2 - -
CLDN3 tum:2.5,epi:2 - -
CLDN7 tum:2.5,epi:2.5 - -
TRPS1 tum:2.5,epi:1.5 - -
KRT81 tum:3 - grad
SERPINA3 tum:2.5 - grad
S100A8 tum:1.5,mac:2.5 - -
MDK tum:2.5 - -
DSP tum:2.5,epi:2.5 - -
LGALS3 tum:2,mac:2 - -
CD9 tum:2,epi:2 - -
EGFR epi:1.5 basal:0.8 -
STARD3 tum:1.5 erbb2:1.2 -
PGAP3 tum:1 erbb2:1.2 -
MIEN1 tum:1.5 erbb2:1 -
PNMT - erbb2:1.3 -
TCAP - erbb2:1.1 -
PSMD3 tum:0.8 erbb2:0.8 -
ORMDL3 tum:0.8 erbb2:0.8 -
TFF1 tum:2 luminal:1.5 -
TFF3 tum:2.5,epi:1.5 luminal:1.2 -
AR tum:1.5,epi:1 luminal:0.8 -
SLC39A6 tum:2 luminal:1 -
AGR3 tum:1.5 luminal:1.2 -
CA12 tum:2 luminal:1 -
NAT1 tum:1.5 luminal:1 -
AFF3 tum:1 luminal:1 -
MGP tum:1.5,fib:2 - grad
CXCL14 fib:2,epi:2.5 - grad
ELF5 epi:3 - -
LTF epi:3.5 - -
PIP tum:1,epi:3 - -
SLPI epi:3,tum:1.5 - -
KIT epi:3,mac:0.5 - -
KRT15 epi:3.5 basal:0.6 -
KRT17 epi:1 basal:1.5 -
KRT6B epi:0.5 basal:1.5 -
TP63 epi:0.5 basal:1.6 -
OXTR epi:1 basal:1.2 -
SFRP1 epi:2 basal:0.8 -
DST epi:2,fib:1 basal:0.6 -
CNN1 fib:0.5 contractile:1.5 -
TAGLN fib:1.5 contractile:1.4 -
DES fib:0.3 contractile:1.5 -
MYLK fib:1 contractile:1.2 -
ACTG2 - contractile:1.6 -
RGS5 endo:1,fib:1.5 contractile:1 -
MCAM endo:2,fib:1 contractile:0.8 -
NOTCH3 fib:1.5 contractile:1.1 -
CENPF - prolif:1.3 -
BIRC5 - prolif:1.3 -
PCNA tum:0.5 prolif:1 -
UBE2C - prolif:1.4 -
TYMS - prolif:1.2 -
CCNB1 - prolif:1.3 -
CDK1 - prolif:1.3 -
AURKA - prolif:1.2 -
MYBL2 - prolif:1.2 -
FOXM1 - prolif:1.2 -
CCNA2 - prolif:1.3 -
KIF2C - prolif:1.2 -
RRM2 - prolif:1.3 -
MCM2 tum:0.5 prolif:1 -
TPX2 - prolif:1.3 -
E2F1 - prolif:1.1 -
SLC2A1 tum:0.5 hypoxia:1.3 -
LDHA tum:1,mac:1 hypoxia:0.8 -
NDRG1 tum:1 hypoxia:1.2 -
ADM endo:1 hypoxia:1.3 -
PGK1 tum:0.5 hypoxia:0.8 -
BNIP3 - hypoxia:1.3 -
ANGPTL4 fib:0.5 hypoxia:1.3 -
P4HA1 - hypoxia:1.2 -
EGLN3 - hypoxia:1.4 -
ERO1A tum:0.5 hypoxia:1.1 -
IFIT1 - ifn:1.4 -
IFIT3 - ifn:1.3 -
MX1 - ifn:1.3 -
STAT1 T:0.5,mac:0.5 ifn:1 -
IFI6 - ifn:1.2 -
OAS1 - ifn:1.2 -
IRF7 - ifn:1.1 -
CXCL9 mac:1.5 ifn:1.4 -
IFI44L - ifn:1.3 -
IDO1 mac:1 ifn:1.3 -
GBP1 endo:0.5 ifn:1.2 -
IFITM1 T:0.5 ifn:1 -
HLA-DRA mac:3,B:3 antigen:1 -
CD74 mac:3,B:3 antigen:0.8 -
HLA-DRB1 mac:2.8,B:2.8 antigen:1 -
HLA-DPA1 mac:2.8,B:2.5 antigen:1 -
HLA-DQA1 mac:2.5,B:2.5 antigen:1 -
CIITA mac:2,B:2 antigen:1 -
COL3A1 fib:4 - -
COL5A1 fib:3.5 caf:0.5 -
COL6A3 fib:3.5 - -
FBLN1 fib:3.5 - -
PDGFRA fib:3.5 - -
SPARC fib:3,endo:2 - -
THY1 fib:3,endo:1 - -
FN1 fib:3 caf:0.8 -
CXCL12 fib:3,endo:1.5 - -
PDPN fib:2.5 - -
MFAP5 fib:3.5 - -
FBN1 fib:3.5 - -
SFRP2 fib:3.5 - -
SFRP4 fib:3.5 - -
MMP2 fib:3.5 - -
CTSK fib:2.5,mac:2 - -
GSN fib:3 - -
PI16 fib:3 - -
DPT fib:3.5 - -
APOD fib:3.5 - -
C7 fib:3.5 - -
OGN fib:3.5 - -
ELN fib:3 - -
TWIST1 fib:2.5 - -
PRRX1 fib:3 - -
ZEB1 fib:2,endo:1.5 - -
FAP fib:2 caf:1.4 -
COL11A1 - caf:1.6 -
MMP11 fib:1 caf:1.5 -
COL10A1 - caf:1.6 -
INHBA fib:1 caf:1.3 -
CTHRC1 fib:1 caf:1.4 -
COL12A1 fib:1.5 caf:1 -
LRRC15 - caf:1.6 -
SULF1 fib:1.5 caf:1 -
MMP14 fib:1.5 caf:0.8 -
TNC fib:1.5 caf:1 -
THBS2 fib:1.5 caf:1.2 -
VCAN fib:2 caf:1 -
CD3D T:4 - -
CD3G T:3.8 - -
CD2 T:3.8 - -
CD247 T:3.5 - -
TRAC T:4 - -
CD5 T:3.5 - -
CD6 T:3.5 - -
CD7 T:3.5 - -
LCK T:3.5 - -
ZAP70 T:3 - -
IL7R T:3 cytotoxic:-0.8 -
CCR7 T:2.5,B:2 - -
SELL T:2,B:2 - -
CD28 T:3 - -
ICOS T:2.5 - -
CD27 T:2.5,B:1.5 - -
LTB T:3,B:3 - -
CXCR4 T:2.5,B:2.5 - -
IL2RA T:2 - -
FOXP3 T:1.5 cytotoxic:-0.8 -
CTLA4 T:2 cytotoxic:-0.5 -
TIGIT T:2.5 - -
PDCD1 T:2 - -
LAG3 T:1.5 cytotoxic:0.6 -
HAVCR2 T:1,mac:2 - -
CXCL13 T:2 - -
TOX T:2 - -
TCF7 T:2.5 - -
CD8B T:1 cytotoxic:1.3 -
GZMK T:1 cytotoxic:1.2 -
GZMA T:1 cytotoxic:1.3 -
NKG7 T:1.5 cytotoxic:1.2 -
PRF1 T:1 cytotoxic:1.3 -
GNLY T:0.5 cytotoxic:1.4 -
KLRD1 T:0.5 cytotoxic:1.2 -
CCL5 T:2 cytotoxic:1 -
IFNG T:0.5 cytotoxic:1.2 -
CD79B B:4 - -
PAX5 B:3.5 - -
BANK1 B:3.5 - -
CD22 B:3.5 - -
CR2 B:3 - -
FCRL5 B:2.5 - -
CXCR5 B:3,T:1 - -
FCER2 B:3 - -
TCL1A B:3 - -
BLK B:3 - -
IGHM B:3.5 - -
IGHD B:3 - -
CD37 B:3,T:2 - -
SPIB B:3 - -
POU2AF1 B:3 - -
JCHAIN B:0.5 plasma:1.6 -
MZB1 B:0.5 plasma:1.5 -
IGKC B:2 plasma:1.5 -
IGHG1 B:0.5 plasma:1.6 -
IGHA1 - plasma:1.6 -
SDC1 tum:1 plasma:1.3 -
TNFRSF17 - plasma:1.5 -
PRDM1 T:0.5 plasma:1.2 -
DERL3 - plasma:1.4 -
CD14 mac:3.8 - -
FCGR3A mac:3,T:0.5 - -
C1QB mac:4 - -
C1QC mac:4 - -
AIF1 mac:3.8 - -
CSF1R mac:3.8 - -
MRC1 mac:3.5,endo:1 - -
APOE mac:3.5 - -
ITGAX mac:3 - -
CD86 mac:3 - -
MS4A7 mac:3.5 - -
TYROBP mac:4 - -
FCER1G mac:4 - -
MARCO mac:3 - -
SPP1 mac:2.5 hypoxia:0.8 -
TREM2 mac:3 - -
MSR1 mac:3.5 - -
LILRB4 mac:3 - -
SIGLEC1 mac:2.5 ifn:0.8 -
FCGR1A mac:3 ifn:0.5 -
MMP9 mac:3 - -
CTSB mac:3,tum:1 - -
CTSD mac:3,tum:1.5 - -
LGMN mac:3 - -
MS4A4A mac:3 - -
VSIG4 mac:3 - -
F13A1 mac:3 - -
STAB1 mac:2.5,endo:1.5 - -
FOLR2 mac:3 - -
LYVE1 mac:2,endo:2.5 - -
CLDN5 endo:4 - -
EMCN endo:3.8 - -
ENG endo:3.5 - -
TEK endo:3.5 - -
FLT1 endo:3.5 - -
PLVAP endo:3.8 - -
AQP1 endo:3.5 - -
RAMP2 endo:3.5 - -
EGFL7 endo:3.8 - -
ESAM endo:3.5 - -
ACKR1 endo:3 - -
SELE endo:2.5 - -
SELP endo:2.5 - -
CD34 endo:3.5,fib:2 - -
CD93 endo:3.5 - -
ROBO4 endo:3.5 - -
TIE1 endo:3.5 - -
MMRN1 endo:2.5 - -
PROX1 endo:2 - -
CCL21 endo:2 - -
LEP adip:4 - -
LPL adip:3.5,mac:1 - -
CIDEA adip:3.5 - -
CIDEC adip:4 - -
PPARG adip:3,mac:1 - -
CD36 adip:3,endo:2.5,mac:1.5 - -
LIPE adip:3.5 - -
PLIN4 adip:4 - -
GPAM adip:3.5 - -
RBP4 adip:3.5 - -
PCK1 adip:3 - -
CFD adip:3,fib:2.5 - -
SCD tum:1,adip:3.5 - -
TRARG1 adip:3.5 - -
SAA1 adip:2 - grad
B2M T:0.5,B:0.5,mac:0.5 - hk
RPLP0 - - hk
EEF1A1 - - hk
TPT1 - - hk
UBC - - hk
HPRT1 - - hk
PPIA - - hk
TBP - - hk
MALAT1 - - hk
RPS18 - - hk
RPL13A - - hk
POLR2A - - hk
PSMB2 - - hk
SDHA - - hk
GUSB - - hk
HMBS - - hk
FOS - stress:1.3 -
FOSB - stress:1.4 -
JUN - stress:1.1 -
JUNB - stress:1.2 -
EGR1 - stress:1.4 -
DUSP1 - stress:1.2 -
ZFP36 - stress:1.1 -
NR4A1 - stress:1.3 -
ATF3 - stress:1.3 -
IER2 - stress:1 -
HSPA1A - stress:1 -
HSPA1B - stress:1 -
KLF4 epi:1 stress:0.8 -
CCN1 fib:1 stress:0.9 -
"""
_N_FIRST = 50

# Xenium control features (names as in real Xenium outputs) and their share of all decoded molecules.
CONTROL_PREFIXES = ("NegControlProbe_", "NegControlCodeword_", "UnassignedCodeword_", "BLANK_")
_CONTROLS = (
    [f"NegControlProbe_{i:05d}" for i in (2, 4, 9, 14, 19, 25, 31, 35, 40, 42)]
    + [f"NegControlCodeword_{500 + i:04d}" for i in range(8)]
    + [f"UnassignedCodeword_{i:04d}" for i in (0, 3, 7, 11, 15, 19, 22, 26)]
    + [f"BLANK_{i:04d}" for i in (6, 13, 37, 69)]
)
_CONTROL_RATE = {
    "NegControlProbe_": 0.0030,
    "NegControlCodeword_": 0.0010,
    "UnassignedCodeword_": 0.0015,
    "BLANK_": 0.0004,
}
_BACKGROUND_RATE = 0.02


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    """An independent generator per (seed, stage), so that no stage's draws depend on another's."""
    words = [int(seed)] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


# --------------------------------------------------------------------------------------------------------------------
# Smooth random fields
# --------------------------------------------------------------------------------------------------------------------
class _Field:
    """A smooth Gaussian random field with unit variance and correlation length ~``scale_um``.

    Stored as white noise smoothed on a coarse lattice; evaluated anywhere by bilinear interpolation, so the values at
    cells, grid nodes and image pixels all agree.
    """

    def __init__(self, rng: np.random.Generator, width: float, height: float, scale_um: float, refine: int = 1) -> None:
        sigma = 1.5
        self.step = scale_um / (2.5 * sigma)
        pad = 4 * self.step
        self.origin = -pad
        nx = int(math.ceil((width + 2 * pad) / self.step)) + 2
        ny = int(math.ceil((height + 2 * pad) / self.step)) + 2
        noise = rng.standard_normal((ny, nx))
        # normalise by the theoretical standard deviation of smoothed white noise (not the sample one), so that a
        # field means the same whatever the size of the slide
        smooth = ndimage.gaussian_filter(noise, sigma, mode="reflect") * (2 * math.sqrt(math.pi) * sigma)
        if refine > 1:
            # a cubic upsampling, so that bilinear reads of the finer lattice have no visible kinks (fibre contours)
            smooth = ndimage.zoom(smooth, refine, order=3, grid_mode=True, mode="nearest")
            # with grid_mode, fine node m sits at coarse coordinate (m + 0.5) / refine - 0.5
            self.origin += -self.step / 2 + self.step / (2 * refine)
            self.step /= refine
        self.values = smooth.astype(np.float32)

    def gradient_at(self, x: np.ndarray, y: np.ndarray, h: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Finite-difference gradient (per µm) at points."""
        gx = (self.at(x + h, y) - self.at(x - h, y)) / (2 * h)
        gy = (self.at(x, y + h) - self.at(x, y - h)) / (2 * h)
        return gx, gy

    def at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Values at points (µm)."""
        x = np.asarray(x, dtype=np.float32)
        y = np.asarray(y, dtype=np.float32)
        coords = np.stack([(y - self.origin) / self.step, (x - self.origin) / self.step])
        out = ndimage.map_coordinates(self.values, coords.reshape(2, -1), order=1, mode="nearest")
        return out.reshape(x.shape).astype(np.float32, copy=False)

    def on_grid(self, nx: int, ny: int, g: float) -> np.ndarray:
        """Values at the centres of a ``ny`` x ``nx`` grid of ``g`` µm cells (separable, fast)."""
        wy = _interp_matrix(((np.arange(ny) + 0.5) * g - self.origin) / self.step, self.values.shape[0])
        wx = _interp_matrix(((np.arange(nx) + 0.5) * g - self.origin) / self.step, self.values.shape[1])
        tmp = wy @ self.values  # (ny, cx)
        return np.asarray((wx @ tmp.T).T, dtype=np.float32)


def _interp_matrix(u: np.ndarray, n: int) -> sparse.csr_matrix:
    """Sparse linear-interpolation weights from ``n`` lattice values to positions ``u`` (lattice units)."""
    u = np.clip(u, 0, n - 1)
    i0 = np.minimum(np.floor(u).astype(np.int64), n - 2)
    f = (u - i0).astype(np.float32)
    rows = np.repeat(np.arange(len(u)), 2)
    cols = np.stack([i0, i0 + 1], axis=1).ravel()
    vals = np.stack([1 - f, f], axis=1).ravel()
    return sparse.csr_matrix((vals, (rows, cols)), shape=(len(u), n))


def _ellipse_rho(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, phi: float) -> np.ndarray:
    """Normalised elliptical radius (1 on the boundary) of points around an ellipse."""
    c, s = math.cos(phi), math.sin(phi)
    dx = x - cx
    dy = y - cy
    u = (dx * c + dy * s) / a
    v = (-dx * s + dy * c) / b
    return np.sqrt(u * u + v * v)


# --------------------------------------------------------------------------------------------------------------------
# The tissue
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Tissue:
    """A simulated tissue section (see :func:`simulate_tissue`).

    Grids are ``ny`` x ``nx`` with ``grid_um`` µm cells; grid cell ``(i, j)`` covers
    ``[j * grid_um, (j + 1) * grid_um) x [i * grid_um, (i + 1) * grid_um)``.
    """

    width_um: float
    height_um: float
    seed: int
    grid_um: float
    tissue: np.ndarray  # bool, under tissue
    alpha: np.ndarray  # uint8, soft tissue mask for rendering (255 = tissue)
    domain: np.ndarray  # int8, index into DOMAINS
    lumen: np.ndarray  # bool, gland or vessel lumen (tissue without cells)
    bg_e: np.ndarray  # uint8, eosin optical density x 200 of the extracellular background
    fibre: np.ndarray  # uint8, 255 where stromal collagen fibres show
    cells: dict[str, np.ndarray]
    modules: np.ndarray  # (n_cells, len(MODULES)) float32 latent module activity
    rbc: dict[str, np.ndarray]  # red blood cells in vessel lumens (image only)
    fields: dict[str, _Field]
    gradient: np.ndarray  # (n_cells,) value of the tissue-wide gradient at each cell
    summary: dict[str, float] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return len(self.cells["x"])

    def lookup(self, grid: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Nearest-grid value at points (µm); points outside the field read the nearest edge."""
        ny, nx = grid.shape
        j = np.clip((np.asarray(x) / self.grid_um).astype(np.int64), 0, nx - 1)
        i = np.clip((np.asarray(y) / self.grid_um).astype(np.int64), 0, ny - 1)
        return grid[i, j]

    @cached_property
    def layers(self) -> dict[str, _Layer]:
        """Ellipse layers used by :func:`render` (built on first use)."""
        return _build_layers(self)


def simulate_tissue(width_um: float, height_um: float, *, seed: int) -> Tissue:
    """Simulate a tissue section of ``width_um`` x ``height_um`` µm.

    Parameters
    ----------
    width_um, height_um
        Size of the field (µm).
    seed
        Seed; the same seed and size give the same tissue.

    Returns
    -------
    The simulated :class:`Tissue`.

    """
    w, h = float(width_um), float(height_um)
    g = GRID_UM
    nx, ny = int(math.ceil(w / g)), int(math.ceil(h / g))
    area_mm2 = w * h / 1e6

    rng = _rng(seed, "fields")
    fields = {
        name: _Field(rng, w, h, scale)
        for name, scale in [
            ("tissue_l", 1500),
            ("tissue_m", 250),
            ("tissue_s", 60),
            ("tumour_l", 400),
            ("tumour_m", 100),
            ("tumour_s", 35),
            ("normal", 800),
            ("adipose_l", 350),
            ("adipose_s", 90),
            ("aggregate", 40),
            ("density", 200),
            ("clone", 700),
            ("prolif", 300),
            ("ifn", 400),
            ("stress", 1200),
            ("gradient", 2000),
            ("fibre_warp", 30),
            ("fibre_break", 20),
            ("stain_h", 800),
            ("stain_e", 800),
        ]
    }
    fields.update({f"cluster_{t}": _Field(rng, w, h, 120) for t in range(len(CELL_TYPES))})
    # collagen fibres follow the contour lines of this field (refined so the contours are smooth)
    fields["fibre"] = _Field(rng, w, h, 250, refine=4)

    # --- outline: a large irregular blob that fades out towards the field edges, with an occasional tear ---
    xs = (np.arange(nx, dtype=np.float32) + 0.5) * g
    ys = (np.arange(ny, dtype=np.float32) + 0.5) * g
    r2 = ((xs[None, :] - w / 2) / (w / 2)) ** 2 + ((ys[:, None] - h / 2) / (h / 2)) ** 2
    score = (
        0.9 * fields["tissue_l"].on_grid(nx, ny, g)
        + 0.35 * fields["tissue_m"].on_grid(nx, ny, g)
        + 0.12 * fields["tissue_s"].on_grid(nx, ny, g)
        - 2.2 * r2**2
    )
    rng = _rng(seed, "structures")
    for _ in range(rng.poisson(area_mm2 / 5)):
        hx, hy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
        hr = rng.uniform(60, 200)
        d2 = ((xs[None, :] - hx) ** 2 + (ys[:, None] - hy) ** 2) / hr**2
        score -= 4.0 * np.exp(-(d2**2))
    threshold = np.quantile(score[:: max(1, ny // 400), :: max(1, nx // 400)], 0.2)
    alpha = np.clip((score - threshold) / 0.06 + 0.5, 0, 1)
    tissue = score > threshold
    del score, r2

    # --- tumour nests: a multi-scale field thresholded so that about a third of the tissue is tumour ---
    # the normal breast (lobules) and the carcinoma occupy different parts of the section
    step = (max(1, ny // 400), max(1, nx // 400))
    normal = fields["normal"].on_grid(nx, ny, g)
    n_sample = normal[:: step[0], :: step[1]][tissue[:: step[0], :: step[1]]]
    normal_zone = tissue & (normal > (np.quantile(n_sample, 0.7) if n_sample.size else np.inf))
    del normal
    tum = (
        fields["tumour_l"].on_grid(nx, ny, g)
        + 0.5 * fields["tumour_m"].on_grid(nx, ny, g)
        + 0.2 * fields["tumour_s"].on_grid(nx, ny, g)
    )
    tum[~tissue | normal_zone] = -1e9
    t_sample = tum[:: step[0], :: step[1]][tissue[:: step[0], :: step[1]]]
    t_thr = np.quantile(t_sample, 0.68) if t_sample.size else np.inf
    domain = np.zeros((ny, nx), dtype=np.int8)
    domain[tum > t_thr] = TUMOUR
    del tum

    # distances (µm) on a coarser grid; enough for placing structures and for smooth programmes
    cf = max(1, int(math.ceil(max(nx, ny) / 1000)))
    cg = g * cf

    def coarse_lookup(arr: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        j = np.clip((np.asarray(x) / cg).astype(np.int64), 0, arr.shape[1] - 1)
        i = np.clip((np.asarray(y) / cg).astype(np.int64), 0, arr.shape[0] - 1)
        return arr[i, j]

    def lookup(arr: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        j = np.clip((np.asarray(x) / g).astype(np.int64), 0, nx - 1)
        i = np.clip((np.asarray(y) / g).astype(np.int64), 0, ny - 1)
        return arr[i, j]

    def dist_to(mask: np.ndarray) -> np.ndarray:
        m = mask[::cf, ::cf]
        if not m.any():
            return np.full(m.shape, 1e6, dtype=np.float32)
        return ndimage.distance_transform_edt(~m, sampling=cg).astype(np.float32)

    d_tum = dist_to(domain == TUMOUR)

    # --- tumour cords and small satellite nests in the stroma near the tumour (many smaller than a Visium spot) ---
    n_cords = rng.poisson(area_mm2 * 0.8 * 10)
    for _ in range(n_cords):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        d = coarse_lookup(d_tum, cx, cy)
        if (
            not (lookup(tissue, cx, cy) and 25 < d < 250)
            or lookup(domain, cx, cy) != STROMA
            or lookup(normal_zone, cx, cy)
        ):
            continue
        a = rng.uniform(6, 45)
        b = min(a, rng.uniform(5, 10))
        _paint(domain, g, cx, cy, a, b, rng.uniform(0, np.pi), TUMOUR, where=tissue & (domain == STROMA))

    # --- adipose islands in the stroma ---
    fat = fields["adipose_l"].on_grid(nx, ny, g) + 0.35 * fields["adipose_s"].on_grid(nx, ny, g)
    f_sample = fat[:: step[0], :: step[1]][tissue[:: step[0], :: step[1]]]
    f_thr = np.quantile(f_sample, 0.9) if f_sample.size else np.inf
    adipose = tissue & (fat > f_thr) & (domain == STROMA)
    del fat

    # --- normal glands: lobules of small acini (20-60 µm) and ducts, away from the tumour ---
    normal_zone &= domain == STROMA
    lumen = np.zeros((ny, nx), dtype=bool)
    glands: list[tuple[float, float, float, float, float, float, bool]] = []  # cx, cy, a, b, phi, lumen ratio, duct
    n_lobules = rng.poisson(area_mm2 * 0.8 * 5.0)
    for _ in range(n_lobules):
        lx, ly = rng.uniform(0, w), rng.uniform(0, h)
        if not lookup(normal_zone, lx, ly):
            continue
        lr = rng.uniform(90, 240)
        placed: list[tuple[float, float, float]] = []
        if rng.random() < 0.6:
            dr = rng.uniform(35, 70)
            placed.append((lx, ly, dr))
            q = rng.uniform(1.0, 1.4)
            glands.append(
                (lx, ly, dr * math.sqrt(q), dr / math.sqrt(q), rng.uniform(0, np.pi), rng.uniform(0.5, 0.65), True)
            )
        n_acini = rng.poisson((lr / 40) ** 2 * 1.0) + 2
        for _ in range(4 * n_acini):
            if len(placed) >= n_acini + 1:
                break
            ang, rad = rng.uniform(0, 2 * np.pi), lr * math.sqrt(rng.random())
            ax, ay = lx + rad * math.cos(ang), ly + rad * math.sin(ang)
            ar = rng.uniform(12, 30)
            if not lookup(normal_zone, ax, ay):
                continue
            if any((ax - px) ** 2 + (ay - py) ** 2 < (ar + pr + 5) ** 2 for px, py, pr in placed):
                continue
            placed.append((ax, ay, ar))
            q = rng.uniform(1.0, 1.35)
            glands.append(
                (ax, ay, ar * math.sqrt(q), ar / math.sqrt(q), rng.uniform(0, np.pi), rng.uniform(0.3, 0.5), False)
            )
    for cx, cy, a, b, phi, lr_, _duct in glands:
        sl, rho = _ellipse_window(ny, nx, g, cx, cy, a, b, phi)
        if rho is None:
            continue
        sub_t = tissue[sl]
        domain[sl][(rho < 1) & sub_t] = GLAND
        lumen[sl] |= (rho < lr_) & sub_t
        adipose[sl] &= rho >= 1.3

    # --- immune aggregates (tertiary lymphoid structures, 20-180 µm), preferably near the tumour border ---
    aggregates: list[tuple[float, float, float]] = []
    n_agg = rng.poisson(area_mm2 * 0.8 * 6)
    for _ in range(n_agg):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        if not lookup(tissue, cx, cy) or lookup(domain, cx, cy) != STROMA or lookup(adipose, cx, cy):
            continue
        if rng.random() > 0.25 + 0.75 * math.exp(-coarse_lookup(d_tum, cx, cy) / 250):
            continue
        r = math.exp(rng.uniform(math.log(20), math.log(180)))
        sl, rho = _ellipse_window(ny, nx, g, cx, cy, 1.3 * r, 1.3 * r, 0.0)
        if rho is None:
            continue
        gy, gx = np.mgrid[sl]
        wobble = fields["aggregate"].at((gx + 0.5) * g, (gy + 0.5) * g)
        inside = (rho * 1.3 < 1 + 0.25 * wobble) & tissue[sl] & (domain[sl] == STROMA)
        domain[sl][inside] = IMMUNE
        adipose[sl] &= ~inside
        aggregates.append((cx, cy, r))

    # --- vessels: capillaries (5-7 µm), small vessels (9-25 µm) and a few larger muscular ones ---
    vessels: list[tuple[float, float, float, float, float, float]] = []  # cx, cy, a, b, phi, lumen ratio
    n_ves = rng.poisson(area_mm2 * 0.8 * 60)
    for _ in range(n_ves):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        if not lookup(tissue, cx, cy) or lookup(lumen, cx, cy):
            continue
        dom = lookup(domain, cx, cy)
        if dom == GLAND or (dom == TUMOUR and rng.random() > 0.35):
            continue
        u = rng.random()
        if u < 0.62:
            r = rng.uniform(4.5, 7.0)
            ratio = (r - 2.2) / r
        elif u < 0.93:
            r = rng.uniform(9, 25)
            ratio = 0.72
        else:
            r = rng.uniform(28, 70)
            ratio = 0.7
        q = rng.uniform(1.0, 2.2)
        a, b, phi = r * math.sqrt(q), r / math.sqrt(q), rng.uniform(0, np.pi)
        sl, rho = _ellipse_window(ny, nx, g, cx, cy, a, b, phi)
        if rho is None or (domain[sl][rho < 1.2] == GLAND).any():
            continue
        sub_t = tissue[sl]
        domain[sl][(rho < 1) & sub_t] = VESSEL
        lumen[sl] |= (rho < ratio) & sub_t
        adipose[sl] &= rho >= 1.1
        vessels.append((cx, cy, a, b, phi, ratio))

    adipose &= domain == STROMA
    lumen &= tissue

    # --- cells ---
    cells, rbc = _place_cells(
        seed, w, h, tissue, domain, lumen, adipose, glands, vessels, aggregates, fields, lookup, coarse_lookup
    )

    # distances and programme activities at the cells
    d_tum = dist_to(domain == TUMOUR)
    d_in = ndimage.distance_transform_edt((domain == TUMOUR)[::cf, ::cf], sampling=cg).astype(np.float32)
    d_imm = dist_to(domain == IMMUNE)
    d_edge = ndimage.distance_transform_edt(np.pad(tissue[::cf, ::cf], 1), sampling=cg)[1:-1, 1:-1].astype(np.float32)
    x, y = cells["x"], cells["y"]
    cells["dist_tumour"] = coarse_lookup(d_tum, x, y)
    cells["depth_tumour"] = coarse_lookup(d_in, x, y)
    cells["dist_immune"] = coarse_lookup(d_imm, x, y)
    cells["depth_tissue"] = coarse_lookup(d_edge, x, y)
    _assign_types(seed, cells, fields, aggregates)
    modules = _module_activity(seed, cells, fields)
    _morphology(seed, cells, fields)

    # tissue-wide gradient used by "grad" genes: a linear ramp in a random direction plus a very smooth field
    grng = _rng(seed, "gradient")
    psi = grng.uniform(0, 2 * np.pi)
    ramp = ((x - w / 2) * math.cos(psi) + (y - h / 2) * math.sin(psi)) / (0.5 * max(w, h))
    gradient = (0.7 * ramp + 0.5 * fields["gradient"].at(x, y)).astype(np.float32)

    # background eosin and fibres for the renderer
    e_domain = np.array([0.50, 0.30, 0.26, 0.62, 0.34], dtype=np.float32)
    bg_e = e_domain[domain]
    bg_e[adipose] = 0.10
    bg_e[lumen] = np.where(domain[lumen] == VESSEL, 0.16, 0.07)
    fibre = (domain == STROMA) & ~lumen & ~adipose
    tissue_area = float(tissue.sum()) * g * g / 1e6
    summary = {
        "tissue_area_mm2": tissue_area,
        "n_cells": len(x),
        "cells_per_mm2": len(x) / max(tissue_area, 1e-9),
        "n_glands": len(glands),
        "n_vessels": len(vessels),
        "n_immune_aggregates": len(aggregates),
        "domain_fraction": {
            name: float((domain[tissue] == k).mean()) if tissue.any() else 0.0 for k, name in enumerate(DOMAINS)
        },
        "cell_type_fraction": {
            name: float((cells["type"] == k).mean()) if len(x) else 0.0 for k, name in enumerate(CELL_TYPES)
        },
    }
    return Tissue(
        width_um=w,
        height_um=h,
        seed=int(seed),
        grid_um=g,
        tissue=tissue,
        alpha=np.round(alpha * 255).astype(np.uint8),
        domain=domain,
        lumen=lumen,
        # smoothed by ~2 µm so that region edges (lumens, fat, aggregates) do not show the grid's staircase
        bg_e=np.round(np.clip(ndimage.gaussian_filter(bg_e, 1.0), 0, 1.27) * 200).astype(np.uint8),
        fibre=np.round(ndimage.gaussian_filter(fibre.astype(np.float32), 1.0) * 255).astype(np.uint8),
        cells=cells,
        modules=modules,
        rbc=rbc,
        fields=fields,
        gradient=gradient,
        summary=summary,
    )


def _ellipse_window(
    ny: int, nx: int, g: float, cx: float, cy: float, a: float, b: float, phi: float
) -> tuple[tuple[slice, slice], np.ndarray | None]:
    """Grid slices of the bounding box of an ellipse and the normalised radius of their nodes."""
    r = max(a, b) + g
    i0, i1 = max(0, int((cy - r) / g)), min(ny, int(math.ceil((cy + r) / g)) + 1)
    j0, j1 = max(0, int((cx - r) / g)), min(nx, int(math.ceil((cx + r) / g)) + 1)
    sl = (slice(i0, i1), slice(j0, j1))
    if i1 <= i0 or j1 <= j0:
        return sl, None
    gy = (np.arange(i0, i1, dtype=np.float32) + 0.5) * g
    gx = (np.arange(j0, j1, dtype=np.float32) + 0.5) * g
    return sl, _ellipse_rho(gx[None, :], gy[:, None], cx, cy, a, b, phi)


def _paint(
    grid: np.ndarray, g: float, cx: float, cy: float, a: float, b: float, phi: float, value: int, where: np.ndarray
) -> None:
    sl, rho = _ellipse_window(grid.shape[0], grid.shape[1], g, cx, cy, a, b, phi)
    if rho is not None:
        grid[sl][(rho < 1) & where[sl]] = value


# --------------------------------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------------------------------
def _ring(
    rng: np.random.Generator,
    cx: float,
    cy: float,
    a: float,
    b: float,
    phi: float,
    spacing: float,
    min_n: int,
    jitter: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points evenly spaced on an ellipse, with the local tangent angle."""
    perim = math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))
    n = max(min_n, int(round(perim / spacing)))
    t = (np.arange(n) + rng.uniform(0, 1)) * (2 * np.pi / n) + rng.normal(0, jitter, n)
    c, s = math.cos(phi), math.sin(phi)
    ex, ey = a * np.cos(t), b * np.sin(t)
    x = cx + ex * c - ey * s
    y = cy + ex * s + ey * c
    tx, ty = -a * np.sin(t), b * np.cos(t)
    tangent = np.arctan2(tx * s + ty * c, tx * c - ty * s)
    return x, y, tangent


def _relax(
    x: np.ndarray, y: np.ndarray, radius: np.ndarray, fixed: np.ndarray, n_iter: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Push apart cells closer than the sum of their radii (a few Jacobi steps); fixed cells do not move."""
    x, y = x.copy(), y.copy()
    if len(x) < 2:
        return x, y
    r_max = float(radius.max())
    for _ in range(n_iter):
        pairs = cKDTree(np.column_stack([x, y])).query_pairs(2 * r_max, output_type="ndarray")
        if len(pairs) == 0:
            break
        i, j = pairs[:, 0], pairs[:, 1]
        dx, dy = x[j] - x[i], y[j] - y[i]
        dist = np.hypot(dx, dy)
        overlap = radius[i] + radius[j] - dist
        keep = (overlap > 0) & ~(fixed[i] & fixed[j])
        i, j, dx, dy, dist, overlap = i[keep], j[keep], dx[keep], dy[keep], dist[keep], overlap[keep]
        dist = np.maximum(dist, 1e-6)
        ux, uy = dx / dist, dy / dist
        wi = np.where(fixed[i], 0.0, np.where(fixed[j], 1.0, 0.5)) * overlap * 0.9
        wj = np.where(fixed[j], 0.0, np.where(fixed[i], 1.0, 0.5)) * overlap * 0.9
        n = len(x)
        x += np.bincount(j, wj * ux, n) - np.bincount(i, wi * ux, n)
        y += np.bincount(j, wj * uy, n) - np.bincount(i, wi * uy, n)
    return x, y


def _place_cells(
    seed: int,
    w: float,
    h: float,
    tissue: np.ndarray,
    domain: np.ndarray,
    lumen: np.ndarray,
    adipose: np.ndarray,
    glands: list,
    vessels: list,
    aggregates: list,
    fields: dict[str, _Field],
    lookup,
    coarse_lookup,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = _rng(seed, "cells")
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    types: list[np.ndarray] = []
    doms: list[np.ndarray] = []
    angles: list[np.ndarray] = []
    flags: list[np.ndarray] = []  # 1 myoepithelial, 2 vascular smooth muscle / pericyte

    def add(x, y, t, d, ang, flag):
        xs.append(np.asarray(x, float))
        ys.append(np.asarray(y, float))
        n = len(xs[-1])
        types.append(np.full(n, t, np.int8))
        doms.append(np.full(n, d, np.int8))
        angles.append(np.asarray(ang, float))
        flags.append(np.full(n, flag, np.int8))

    # epithelium of glands: a luminal ring (radial nuclei) and an outer myoepithelial ring (flat nuclei)
    for cx, cy, a, b, phi, lr, duct in glands:
        thick = min(a, b) * (1 - lr)
        layers = max(1, int(round((thick - 3) / 9))) if duct else 1
        for k in range(layers):
            f = lr + (1 - lr) * (k + 0.5) / layers * (1 - 2.5 / max(thick, 3))
            x, y, tang = _ring(rng, cx, cy, a * f, b * f, phi, 7.0, 4, 0.05)
            add(x, y, EPI, GLAND, tang + np.pi / 2, 0)
        x, y, tang = _ring(rng, cx, cy, a - 1.3, b - 1.3, phi, 13.0, 3, 0.1)
        add(x, y, EPI, GLAND, tang, 1)

    # vessels: endothelium lining the lumen, smooth muscle / pericytes in thicker walls; red cells in the lumen
    rbc_x: list[np.ndarray] = []
    rbc_y: list[np.ndarray] = []
    for cx, cy, a, b, phi, ratio in vessels:
        la, lb = a * ratio, b * ratio
        x, y, tang = _ring(rng, cx, cy, la + 1.0, lb + 1.0, phi, 15.0, 1, 0.15)
        if len(x) <= 2 and a < 8:
            x, y, tang = x[:2], y[:2], tang[:2]
        add(x, y, ENDO, VESSEL, tang, 0)
        wall = min(a, b) * (1 - ratio)
        if wall >= 4.5:
            n_layers = max(1, int(round(wall / 6)))
            for k in range(n_layers):
                f = (min(a, b) * ratio + 2.5 + (k + 0.5) * (wall - 2.5) / n_layers) / min(a, b)
                x, y, tang = _ring(rng, cx, cy, a * f, b * f, phi, 9.0, 3, 0.1)
                add(x, y, FIB, VESSEL, tang, 2)
        if lb > 3.5:
            n_rbc = rng.poisson(math.pi * la * lb / 60 * rng.uniform(0.1, 1.0))
            t, rr = rng.uniform(0, 2 * np.pi, n_rbc), np.sqrt(rng.random(n_rbc))
            ex, ey = (la - 3.3) * rr * np.cos(t), (lb - 3.3) * rr * np.sin(t)
            c, s = math.cos(phi), math.sin(phi)
            rbc_x.append(cx + ex * c - ey * s)
            rbc_y.append(cy + ex * s + ey * c)

    n_obj = sum(len(v) for v in xs)

    # adipocytes: large cells packed in the adipose islands
    d_adip = 1 / 750
    n = rng.poisson(w * h * d_adip)
    ax, ay = rng.uniform(0, w, n), rng.uniform(0, h, n)
    ok = lookup(adipose, ax, ay)
    ax, ay = ax[ok], ay[ok]
    ax, ay = _relax(ax, ay, np.full(len(ax), 16.0), np.zeros(len(ax), bool), n_iter=6)
    ok = lookup(adipose, ax, ay) & ~lookup(lumen, ax, ay)
    ax, ay = ax[ok], ay[ok]
    if len(ax) > 1:
        nn = cKDTree(np.column_stack([ax, ay])).query(np.column_stack([ax, ay]), k=2)[0][:, 1]
    else:
        nn = np.full(len(ax), 40.0)
    # neighbours touch: fat is a packed foam of adipocytes
    adip_r = np.clip(0.5 * nn, 12, 30)

    # free cells: a thinned Poisson process whose intensity depends on the domain, then relaxed to avoid overlaps
    d_max = 1 / 55
    n = rng.poisson(w * h * d_max)
    fx, fy = rng.uniform(0, w, n), rng.uniform(0, h, n)
    dom = lookup(domain, fx, fy)
    allowed = lookup(tissue, fx, fy) & ~lookup(lumen, fx, fy) & (dom <= IMMUNE)
    in_fat = lookup(adipose, fx, fy)
    het = fields["density"].at(fx, fy)
    dens = np.select(
        [in_fat, dom == STROMA, dom == TUMOUR, dom == IMMUNE],
        [np.full(n, 1 / 2500), np.exp(0.35 * het) / 420, np.exp(0.12 * het) / 135, np.full(n, 1 / 62)],
        0.0,
    )
    keep = allowed & (rng.random(n) < dens / d_max)
    fx, fy, dom = fx[keep], fy[keep], dom[keep]
    r_free = np.select([dom == TUMOUR, dom == IMMUNE], [4.9, 3.3], 5.5)

    obj_x = np.concatenate(xs) if xs else np.zeros(0)
    obj_y = np.concatenate(ys) if ys else np.zeros(0)
    all_x = np.concatenate([obj_x, fx])
    all_y = np.concatenate([obj_y, fy])
    radius = np.concatenate([np.full(n_obj, 3.0), r_free])
    fixed = np.concatenate([np.ones(n_obj, bool), np.zeros(len(fx), bool)])
    all_x, all_y = _relax(all_x, all_y, radius, fixed, n_iter=3)
    fx, fy = all_x[n_obj:], all_y[n_obj:]
    dom_after = lookup(domain, fx, fy)
    ok = (
        lookup(tissue, fx, fy)
        & ~lookup(lumen, fx, fy)
        & (dom_after <= IMMUNE)
        & (fx >= 0)
        & (fx < w)
        & (fy >= 0)
        & (fy < h)
    )
    if len(ax):
        d, k = cKDTree(np.column_stack([ax, ay])).query(np.column_stack([fx, fy]), k=1)
        ok &= d > 0.85 * adip_r[k]
    fx, fy, dom = fx[ok], fy[ok], dom_after[ok]

    add(fx, fy, -1, 0, np.full(len(fx), np.nan), 0)
    doms[-1] = dom.astype(np.int8)
    add(ax, ay, ADIP, STROMA, rng.uniform(0, np.pi, len(ax)), 0)

    cells = {
        "x": np.concatenate(xs),
        "y": np.concatenate(ys),
        "type": np.concatenate(types),
        "domain": np.concatenate(doms),
        "angle": np.concatenate(angles),
        "flag": np.concatenate(flags),
    }
    cells["cell_r_hint"] = np.zeros(len(cells["x"]))
    cells["cell_r_hint"][-len(ax) :] = adip_r if len(ax) else 0
    inside = (cells["x"] >= 0) & (cells["x"] < w) & (cells["y"] >= 0) & (cells["y"] < h)
    cells = {k: v[inside] for k, v in cells.items()}
    # spatial order (tiles of 250 µm, row by row), as instruments write cells and molecules field by field
    tile = (cells["y"] // 250).astype(np.int64) * int(math.ceil(w / 250) + 1) + (cells["x"] // 250).astype(np.int64)
    order = np.lexsort((cells["x"], tile))
    cells = {k: v[order] for k, v in cells.items()}
    rbc = {
        "x": np.concatenate(rbc_x) if rbc_x else np.zeros(0),
        "y": np.concatenate(rbc_y) if rbc_y else np.zeros(0),
    }
    return cells, rbc


def _assign_types(seed: int, cells: dict[str, np.ndarray], fields: dict[str, _Field], aggregates: list) -> None:
    """Cell types of the free cells, from domain mixtures with local clustering and zonation."""
    rng = _rng(seed, "types")
    free = cells["type"] < 0
    x, y, dom = cells["x"][free], cells["y"][free], cells["domain"][free]
    n = len(x)
    mix = np.array(
        [
            # tum  epi   fib   T     B     mac   endo  adip
            [0.015, 0.0, 0.68, 0.08, 0.02, 0.12, 0.085, 0.0],  # stroma
            [0.86, 0.0, 0.03, 0.05, 0.005, 0.05, 0.005, 0.0],  # tumour
            [0.0, 0.0, 0.04, 0.50, 0.33, 0.09, 0.04, 0.0],  # immune
        ]
    )
    logits = np.log(mix[np.minimum(dom, 2)] + 1e-9)
    for t in (TUM, FIB, TC, BC, MAC, ENDO):
        logits[:, t] += 0.9 * fields[f"cluster_{t}"].at(x, y)
    near_tumour = np.exp(-cells["dist_tumour"][free] / 60)
    logits[:, TC] += 1.2 * near_tumour * (dom == STROMA)
    logits[:, MAC] += 0.8 * near_tumour * (dom == STROMA)
    logits[:, TC] += 1.0 * np.exp(-cells["depth_tumour"][free] / 30) * (dom == TUMOUR)
    if aggregates:
        agg = np.array(aggregates)
        d, k = cKDTree(agg[:, :2]).query(np.column_stack([x, y]), k=1)
        rel = d / agg[k, 2]
        big = agg[k, 2] > 45
        # B-cell follicle in the centre of large aggregates, T cells around it
        logits[:, BC] += np.where((dom == IMMUNE) & big, 2.5 * (0.6 - rel), 0.0)
    gumbel = -np.log(-np.log(rng.random((n, len(CELL_TYPES)))))
    cells["type"][free] = np.argmax(logits + gumbel, axis=1).astype(np.int8)


def _module_activity(seed: int, cells: dict[str, np.ndarray], fields: dict[str, _Field]) -> np.ndarray:
    """Latent per-cell activity of each co-expression module (spatially structured and cell-specific)."""
    rng = _rng(seed, "modules")
    x, y, t = cells["x"], cells["y"], cells["type"].astype(np.int64)
    n = len(x)
    noise = rng.standard_normal((n, len(MODULES))).astype(np.float32)
    clone = 1 / (1 + np.exp(-2.5 * fields["clone"].at(x, y)))
    myo = cells["flag"] == 1
    smc = cells["flag"] == 2
    p_cyc = np.where(t == TUM, np.clip(0.22 + 0.12 * fields["prolif"].at(x, y) + 0.1 * clone, 0.03, 0.6), 0.0)
    p_cyc = np.where((t == TC) | (t == BC), np.where(cells["domain"] == IMMUNE, 0.08, 0.03), p_cyc)
    p_cyc = np.where((t != TUM) & (t != TC) & (t != BC) & (t != ADIP), 0.02, p_cyc)
    u = rng.random((n, 4))
    cycling = u[:, 0] < p_cyc
    cells["cycling"] = cycling
    cells["mitotic"] = cycling & (u[:, 1] < 0.08)
    cd8 = (t == TC) & (u[:, 2] < 0.35 + 0.3 * np.exp(-cells["dist_tumour"] / 100))
    plasma = (t == BC) & (u[:, 3] < np.where(cells["domain"] == IMMUNE, 0.05, 0.5))
    cells["cd8"] = cd8
    cells["plasma"] = plasma
    cells["clone"] = clone.astype(np.float32)
    ifn_raw = 2.0 * np.exp(-cells["dist_immune"] / 150) + 0.5 * np.maximum(fields["ifn"].at(x, y), 0)
    raw = np.stack(
        [
            2.8 * cycling + 0.25 * noise[:, 0],
            2.5 * np.clip((cells["depth_tumour"] - 30) / 120, 0, 1.2) + 0.25 * noise[:, 1],
            ifn_raw + 0.2 * noise[:, 2],
            2.8 * clone + 0.2 * noise[:, 3],
            2.2 * (1 - clone) * ~myo + 0.3 * noise[:, 4],
            2.8 * myo + 0.2 * noise[:, 5],
            2.8 * (smc | myo) + 1.2 * np.exp(-cells["dist_tumour"] / 60) * (t == FIB) + 0.2 * noise[:, 6],
            2.4 * np.exp(-cells["dist_tumour"] / 80) + 0.3 * noise[:, 7],
            2.4 * cd8 + 0.2 * noise[:, 8],
            3.5 * plasma + 0.2 * noise[:, 9],
            1.0 + 0.8 * ifn_raw + 0.2 * noise[:, 10],
            2.0 * np.exp(-cells["depth_tissue"] / 250) + 0.6 * fields["stress"].at(x, y) + 0.2 * noise[:, 11],
        ],
        axis=1,
    )
    return (_GATES[t] * raw).astype(np.float32)


def _morphology(seed: int, cells: dict[str, np.ndarray], fields: dict[str, _Field]) -> None:
    """Nucleus and cytoplasm geometry and stain intensities per cell."""
    rng = _rng(seed, "morphology")
    t = cells["type"].astype(np.int64)
    x, y = cells["x"], cells["y"]
    n = len(x)
    z = rng.standard_normal((n, 6))
    nuc_a = _M["nuc_a"][t] * np.exp(_M["nuc_sd"][t] * z[:, 0])
    # higher-grade (ERBB2-amplified) tumour clone: larger nuclei; cycling cells slightly larger and darker
    nuc_a *= np.where(t == TUM, 1 + 0.22 * cells["clone"], 1.0) * np.where(cells["cycling"], 1.08, 1.0)
    nuc_b = np.minimum(nuc_a * _M["nuc_ratio"][t] * np.exp(0.08 * z[:, 1]), nuc_a)
    hema = _M["H"][t] * np.exp(0.08 * z[:, 2]) * np.where(cells["cycling"], 1.1, 1.0)
    mitotic = cells["mitotic"]
    hema = np.where(mitotic, hema * 1.6, hema)
    nuc_b = np.where(mitotic, nuc_b * 0.6, nuc_b)

    angle = cells["angle"].copy()
    fib = (t == FIB) & np.isnan(angle)
    # fibroblasts lie along the collagen fibres, i.e. along the contour lines of the fibre field
    gx, gy = fields["fibre"].gradient_at(x[fib], y[fib])
    angle[fib] = np.arctan2(gy, gx) + np.pi / 2 + 0.2 * rng.standard_normal(fib.sum())
    rest = np.isnan(angle)
    angle[rest] = rng.uniform(0, np.pi, rest.sum())

    # cytoplasm: type size, limited by the distance to the nearest neighbour so that packed cells do not overlap
    pts = np.column_stack([x, y])
    nn = cKDTree(pts).query(pts, k=2)[0][:, 1] if n > 1 else np.full(n, 50.0)
    r_cell = _M["cell_r"][t] * np.exp(0.1 * z[:, 3])
    r_cell = np.minimum(r_cell, np.maximum(0.62 * nn, nuc_a * 0.9))
    adip = t == ADIP
    r_cell[adip] = cells["cell_r_hint"][adip]
    q = _M["cell_ratio"][t]
    cell_a = np.maximum(r_cell / np.sqrt(q), nuc_a + 0.8)
    cell_b = np.maximum(r_cell * np.sqrt(q), nuc_b + 0.8)

    # nucleus centre: the cell centre, except in adipocytes where a flat nucleus is pushed against the membrane
    nuc_x, nuc_y = x.copy(), y.copy()
    if adip.any():
        ang = rng.uniform(0, 2 * np.pi, adip.sum())
        rr = cell_b[adip] - nuc_b[adip] - 0.6
        nuc_x[adip] = x[adip] + rr * np.cos(ang)
        nuc_y[adip] = y[adip] + rr * np.sin(ang)
        cells_angle_adip = ang + np.pi / 2
        angle[adip] = cells_angle_adip
        cell_a[adip] = cell_b[adip] = r_cell[adip]

    cells.update(
        nuc_x=nuc_x,
        nuc_y=nuc_y,
        nuc_a=nuc_a.astype(np.float32),
        nuc_b=nuc_b.astype(np.float32),
        angle=angle.astype(np.float32),
        cell_a=cell_a.astype(np.float32),
        cell_b=cell_b.astype(np.float32),
        hema=hema.astype(np.float32),
        eosin=(_M["E"][t] * np.exp(0.08 * z[:, 4])).astype(np.float32),
        dapi=(_M["dapi"][t] * np.exp(0.1 * z[:, 5]) * np.where(mitotic, 1.5, 1.0)).astype(np.float32),
        z=rng.uniform(9.0, 15.0, n).astype(np.float32),
        size_noise=(0.3 * rng.standard_normal(n)).astype(np.float32),
        area=(np.pi * cell_a * cell_b).astype(np.float32),
        nucleus_area=(np.pi * nuc_a * nuc_b).astype(np.float32),
    )
    cells.pop("cell_r_hint")


# --------------------------------------------------------------------------------------------------------------------
# Genes and expression
# --------------------------------------------------------------------------------------------------------------------
def _catalogue() -> list[tuple[str, dict[int, float], dict[int, float], set[str]]]:
    """Parsed gene catalogue in panel order: the first block as written, then groups interleaved round-robin."""
    entries = []
    for line in _CATALOGUE.strip().splitlines():
        sym, types, mods, flags = line.split()
        t = {} if types == "-" else {_ABBREV[k]: float(v) for k, v in (p.split(":") for p in types.split(","))}
        m = {} if mods == "-" else {MODULES.index(k): float(v) for k, v in (p.split(":") for p in mods.split(","))}
        f = set() if flags == "-" else set(flags.split(","))
        entries.append((sym, t, m, f))
    first, rest = entries[:_N_FIRST], entries[_N_FIRST:]
    groups: dict[str, list] = {}
    for e in rest:
        key = "hk" if "hk" in e[3] else (f"m{min(e[2])}" if e[2] else f"t{min(e[1], key=lambda k: -e[1][k])}")
        groups.setdefault(key, []).append(e)
    queues = list(groups.values())
    ordered = []
    while any(queues):
        for q in queues:
            if q:
                ordered.append(q.pop(0))
    return first + ordered


@dataclass
class GenePanel:
    """A gene panel with its expression programmes (log scale, per unit of mRNA content)."""

    names: list[str]
    type_log: np.ndarray  # (n_types, n_genes) log expression per cell type
    module_loading: np.ndarray  # (n_modules, n_genes)
    gradient_loading: np.ndarray  # (n_genes,)
    housekeeping: np.ndarray  # (n_genes,) bool
    markers: dict[str, list[str]]  # cell type -> genes with a strong fold change in that type

    @property
    def n_genes(self) -> int:
        """Number of genes."""
        return len(self.names)

    def log_expression(self, tissue: Tissue, idx: slice | np.ndarray) -> np.ndarray:
        """Unscaled log expected expression of cells ``idx`` (cells x genes)."""
        c = tissue.cells
        t = c["type"][idx].astype(np.int64)
        size = np.log(_M["rna"][t]) + 0.5 * np.log(c["area"][idx] / _MEAN_AREA[t])
        out = self.type_log[t] + tissue.modules[idx] @ self.module_loading
        out += tissue.gradient[idx, None] * self.gradient_loading[None, :]
        out += (size + c["size_noise"][idx])[:, None]
        return out


_MEAN_AREA = np.pi * _M["cell_r"] ** 2


def gene_panel(n_genes: int, *, seed: int) -> GenePanel:
    """The first ``n_genes`` genes of the catalogue (then ``GENE<n>`` genes with random programmes).

    Each gene's programme depends only on ``seed`` and the gene's position, so a small panel is the start of a
    larger one.
    """
    cat = _catalogue()
    names, type_log, loading, grad, hk = [], [], [], [], []
    for i in range(n_genes):
        rng = _rng(seed, "gene", i)
        if i < len(cat):
            sym, t, m, f = cat[i]
        else:
            sym, t, m, f = f"GENE{i - len(cat) + 1}", {}, {}, set()
            u = rng.random()
            if u < 0.55:
                t = {int(rng.integers(len(CELL_TYPES))): rng.uniform(1.5, 3.5)}
            elif u < 0.8:
                m = {int(rng.integers(len(MODULES))): rng.uniform(0.6, 1.3)}
            elif u < 0.9:
                f = {"grad"}
        base = rng.normal(-3.0, 0.5) if (t or m) else rng.normal(-1.6, 0.5)
        if "hk" in f:
            base = rng.normal(0.3, 0.3)
        lt = base + rng.normal(0, 0.3 if "hk" not in f else 0.1, len(CELL_TYPES))
        for k, v in t.items():
            lt[k] += v * rng.uniform(0.9, 1.1)
        lm = np.zeros(len(MODULES))
        for k, v in m.items():
            lm[k] = v * rng.uniform(0.9, 1.1)
        names.append(sym)
        type_log.append(lt)
        loading.append(lm)
        grad.append(rng.choice([-1, 1]) * rng.uniform(0.6, 1.0) if "grad" in f else 0.0)
        hk.append("hk" in f)
    type_log_arr = np.array(type_log, dtype=np.float32).T.reshape(len(CELL_TYPES), n_genes)
    markers = {
        ct: [n for n, lt in zip(names, type_log, strict=True) if lt[k] - np.median(lt) > 2.5]
        for k, ct in enumerate(CELL_TYPES)
    }
    return GenePanel(
        names=names,
        type_log=type_log_arr,
        module_loading=np.array(loading, dtype=np.float32).T.reshape(len(MODULES), n_genes),
        gradient_loading=np.array(grad, dtype=np.float32),
        housekeeping=np.array(hk, dtype=bool),
        markers=markers,
    )


def default_transcripts_per_cell(n_genes: int) -> float:
    """Default mean molecules per cell: grows slowly with the panel (45.5 for 50 genes, 57 for 300).

    Calibrated so that ``size_um="slide"`` with 300 genes gives about 10 million Xenium transcripts.
    """
    return 45.5 * (n_genes / 50) ** 0.125


@dataclass
class Transcripts:
    """Molecules in µm. ``cell`` is the cell a molecule is assigned to (-1: none), ``source`` the cell it came from."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    feature: np.ndarray  # int16 index into feature_names
    cell: np.ndarray  # int32
    source: np.ndarray  # int32 (-1 for background and controls)
    overlaps_nucleus: np.ndarray  # uint8
    qv: np.ndarray  # float32
    feature_names: list[str]
    n_genes: int
    scale: float  # the factor that turns exp(log_expression) into expected molecules

    def __len__(self) -> int:
        return len(self.x)


def _expression_scale(tissue: Tissue, panel: GenePanel, transcripts_per_cell: float) -> float:
    """Global factor so that the mean expected molecules per cell is ``transcripts_per_cell``."""
    n = tissue.n_cells
    if n == 0:
        return 1.0
    idx = np.arange(0, n, max(1, n // 20000))
    total = np.exp(panel.log_expression(tissue, idx)).sum(axis=1).mean()
    return float(transcripts_per_cell / total)


def simulate_transcripts(
    tissue: Tissue,
    panel: GenePanel,
    *,
    transcripts_per_cell: float,
    seed: int,
    assay_noise: bool = True,
) -> Transcripts:
    """Draw the molecules of ``panel`` in the cells of ``tissue``.

    Counts are Poisson given the cell's expected expression. Molecules lie in the cell (a share in the nucleus, the
    rest concentrated towards it), ~6% spill outside and are assigned to the cell they land in (or to none), as a
    segmentation-based assay would. With ``assay_noise``, Xenium background molecules and control features are added.
    The cell molecules (positions, genes) do not depend on ``assay_noise``.
    """
    cells = tissue.cells
    n_cells = tissue.n_cells
    scale = _expression_scale(tissue, panel, transcripts_per_cell)
    rng = _rng(seed, "counts", panel.n_genes)
    cell_idx, gene_idx = [], []
    chunk = max(1, 2_000_000 // max(panel.n_genes, 1))
    for s in range(0, n_cells, chunk):
        sl = slice(s, min(n_cells, s + chunk))
        lam = np.exp(panel.log_expression(tissue, sl)) * scale
        counts = rng.poisson(lam)
        ci, gi = np.nonzero(counts)
        k = counts[ci, gi]
        cell_idx.append(np.repeat((ci + s).astype(np.int32), k))
        gene_idx.append(np.repeat(gi.astype(np.int16), k))
    src = np.concatenate(cell_idx) if cell_idx else np.zeros(0, np.int32)
    gene = np.concatenate(gene_idx) if gene_idx else np.zeros(0, np.int16)
    n = len(src)

    # positions: nucleus (uniform in the nucleus), cytoplasm (denser near the centre), or spilled outside the cell
    rng = _rng(seed, "positions", panel.n_genes)
    u = rng.random((5, n), dtype=np.float32)
    t = cells["type"][src].astype(np.int64)
    p_nuc = _M["p_nuc"][t].astype(np.float32)
    in_nuc = u[0] < p_nuc
    outside = ~in_nuc & (u[0] > 1 - 0.06)
    ang = u[1] * np.float32(2 * np.pi)
    rad = np.where(in_nuc, np.sqrt(u[2]) * 0.97, u[2] ** 0.7)
    rad = np.where(outside, 1 + rng.exponential(0.3, n).astype(np.float32), rad)
    a = np.where(in_nuc, cells["nuc_a"][src], cells["cell_a"][src])
    b = np.where(in_nuc, cells["nuc_b"][src], cells["cell_b"][src])
    phi = cells["angle"][src]
    cxs = np.where(in_nuc, cells["nuc_x"][src], cells["x"][src])
    cys = np.where(in_nuc, cells["nuc_y"][src], cells["y"][src])
    ex, ey = a * rad * np.cos(ang), b * rad * np.sin(ang)
    c, s_ = np.cos(phi), np.sin(phi)
    x = (cxs + ex * c - ey * s_).astype(np.float32)
    y = (cys + ex * s_ + ey * c).astype(np.float32)
    z = (cells["z"][src] + (u[3] - 0.5) * 3.0).astype(np.float32)
    del u, a, b, cxs, cys, ex, ey, c, s_, rad, ang
    # molecules spilled beyond the imaged field are not observed
    seen = (x >= 0) & (x < tissue.width_um) & (y >= 0) & (y < tissue.height_um)
    if not seen.all():
        x, y, z, src, gene, in_nuc, outside = (v[seen] for v in (x, y, z, src, gene, in_nuc, outside))
        n = len(x)
    feature_names = list(panel.names)
    if not assay_noise:
        return Transcripts(
            x=x,
            y=y,
            z=z,
            feature=gene,
            cell=src,
            source=src,
            overlaps_nucleus=np.zeros(n, np.uint8),
            qv=np.zeros(n, np.float32),
            feature_names=feature_names,
            n_genes=panel.n_genes,
            scale=scale,
        )

    # Xenium-like assay noise: ambient background molecules and control features, anywhere on the tissue
    rng = _rng(seed, "assay", panel.n_genes)
    freq = np.bincount(gene, minlength=panel.n_genes).astype(np.float64)
    freq = freq / freq.sum() if freq.sum() > 0 else np.full(panel.n_genes, 1 / max(panel.n_genes, 1))
    n_bg = rng.poisson(_BACKGROUND_RATE * n)
    bx, by = _uniform_on_tissue(rng, tissue, n_bg, 0.9)
    bgene = rng.choice(panel.n_genes, size=n_bg, p=freq).astype(np.int16) if panel.n_genes else np.zeros(0, np.int16)
    ctrl_x, ctrl_y, ctrl_f = [], [], []
    for prefix, rate in _CONTROL_RATE.items():
        names = [k for k in _CONTROLS if k.startswith(prefix)]
        m = rng.poisson(rate * n)
        px, py = _uniform_on_tissue(rng, tissue, m, 0.7)
        ctrl_x.append(px)
        ctrl_y.append(py)
        ctrl_f.append((panel.n_genes + _CONTROLS.index(names[0]) + rng.integers(0, len(names), m)).astype(np.int16))
    feature_names += _CONTROLS
    ex_x = np.concatenate([bx, *ctrl_x]).astype(np.float32)
    ex_y = np.concatenate([by, *ctrl_y]).astype(np.float32)
    ex_f = np.concatenate([bgene, *ctrl_f]).astype(np.int16)
    ex_z = rng.uniform(7.0, 17.0, len(ex_x)).astype(np.float32)

    x = np.concatenate([x, ex_x])
    y = np.concatenate([y, ex_y])
    z = np.concatenate([z, ex_z])
    feature = np.concatenate([gene, ex_f])
    source = np.concatenate([src, np.full(len(ex_x), -1, np.int32)])
    cell = source.copy()

    # molecules outside their cell, and extra molecules, go to the cell they fall in (or to none)
    reassign = np.concatenate([outside, np.ones(len(ex_x), bool)])
    ri = np.flatnonzero(reassign)
    if n_cells and len(ri):
        tree = cKDTree(np.column_stack([cells["x"], cells["y"]]))
        _, k = tree.query(np.column_stack([x[ri], y[ri]]), k=1)
        k = k.astype(np.int32)
        inside = _in_ellipse(
            x[ri], y[ri], cells["x"][k], cells["y"][k], cells["cell_a"][k], cells["cell_b"][k], cells["angle"][k]
        )
        cell[ri] = np.where(inside, k, -1)
    else:
        cell[ri] = -1
    assigned = cell >= 0
    ci = np.where(assigned, cell, 0)
    overlaps = assigned & _in_ellipse(
        x, y, cells["nuc_x"][ci], cells["nuc_y"][ci], cells["nuc_a"][ci], cells["nuc_b"][ci], cells["angle"][ci]
    )

    # quality values (phred-like, 0-40): decoded genes are mostly high, controls and background lower
    rng = _rng(seed, "qv", panel.n_genes)
    is_gene = np.concatenate([np.ones(n, bool), np.zeros(len(ex_x), bool)])
    qv = np.where(is_gene, 40 - rng.gamma(1.5, 4.0, len(x)), 40 - rng.gamma(2.0, 8.0, len(x)))
    qv = np.clip(qv, 0, 40).astype(np.float32)

    # write molecules field of view by field of view (250 µm), like the instrument
    nfx = int(math.ceil(tissue.width_um / 250)) + 1
    fov = (y // 250).astype(np.int32) * nfx + (x // 250).astype(np.int32)
    order = np.argsort(fov, kind="stable")
    return Transcripts(
        x=x[order],
        y=y[order],
        z=z[order],
        feature=feature[order],
        cell=cell[order],
        source=source[order],
        overlaps_nucleus=overlaps[order].astype(np.uint8),
        qv=qv[order],
        feature_names=feature_names,
        n_genes=panel.n_genes,
        scale=scale,
    )


def _in_ellipse(x, y, cx, cy, a, b, phi) -> np.ndarray:
    c, s = np.cos(phi), np.sin(phi)
    dx, dy = x - cx, y - cy
    u = (dx * c + dy * s) / a
    v = (-dx * s + dy * c) / b
    return u * u + v * v <= 1.0


def _uniform_on_tissue(
    rng: np.random.Generator, tissue: Tissue, n: int, on_tissue: float
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uniform points, a share ``on_tissue`` of them under tissue (when there is tissue)."""
    w, h = tissue.width_um, tissue.height_um
    n_on = rng.binomial(n, on_tissue) if tissue.tissue.any() else 0
    xs, ys = [rng.uniform(0, w, n - n_on)], [rng.uniform(0, h, n - n_on)]
    got = 0
    while got < n_on:
        m = int((n_on - got) * 1.5) + 16
        px, py = rng.uniform(0, w, m), rng.uniform(0, h, m)
        keep = tissue.lookup(tissue.tissue, px, py)
        px, py = px[keep][: n_on - got], py[keep][: n_on - got]
        xs.append(px)
        ys.append(py)
        got += len(px)
    return np.concatenate(xs), np.concatenate(ys)


# --------------------------------------------------------------------------------------------------------------------
# Sequencing-based capture (Visium, Visium HD)
# --------------------------------------------------------------------------------------------------------------------
def _captured(
    tissue: Tissue, tx: Transcripts, *, efficiency: float, diffusion_um: float, ambient: float, seed: int, key: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell molecules kept with probability ``efficiency``, displaced by lateral diffusion, plus ambient molecules."""
    rng = _rng(seed, "capture", key, tx.n_genes)
    genes = tx.feature < tx.n_genes
    keep = genes & (rng.random(len(tx)) < efficiency)
    x = tx.x[keep] + rng.normal(0, diffusion_um, keep.sum()).astype(np.float32)
    y = tx.y[keep] + rng.normal(0, diffusion_um, keep.sum()).astype(np.float32)
    g = tx.feature[keep]
    n_amb = rng.poisson(ambient * keep.sum())
    if n_amb and len(g):
        freq = np.bincount(g, minlength=tx.n_genes) / len(g)
        ax, ay = rng.uniform(0, tissue.width_um, n_amb), rng.uniform(0, tissue.height_um, n_amb)
        ag = rng.choice(tx.n_genes, size=n_amb, p=freq).astype(np.int16)
        x, y, g = np.concatenate([x, ax]), np.concatenate([y, ay]), np.concatenate([g, ag])
    return x.astype(np.float64), y.astype(np.float64), g


@dataclass
class SpotLattice:
    """Visium spots (55 µm discs on a 100 µm hexagonal lattice) in µm."""

    x: np.ndarray
    y: np.ndarray
    array_row: np.ndarray
    array_col: np.ndarray
    in_tissue: np.ndarray
    counts: sparse.csr_matrix  # spots x genes (all spots)
    diameter_um: float = 55.0
    pitch_um: float = 100.0


def spot_lattice(width: float, height: float, pitch: float = 100.0, diameter: float = 55.0):
    """Spot centres of a hexagonal lattice covering the field (rows ``pitch * sqrt(3)/2`` apart)."""
    dy = pitch * math.sqrt(3) / 2
    margin = diameter / 2 + 2
    n_rows = max(1, int((height - 2 * margin) // dy) + 1)
    rows, cols = [], []
    for r in range(n_rows):
        c0 = r % 2
        n_c = max(0, int((width - 2 * margin - c0 * pitch / 2) // pitch) + 1)
        cols.append(c0 + 2 * np.arange(n_c))
        rows.append(np.full(n_c, r))
    array_row = np.concatenate(rows)
    array_col = np.concatenate(cols)
    return margin + array_col * pitch / 2, margin + array_row * dy, array_row, array_col


def capture_spots(
    tissue: Tissue,
    tx: Transcripts,
    *,
    efficiency: float,
    diffusion_um: float = 2.0,
    ambient: float = 0.03,
    seed: int,
) -> SpotLattice:
    """Visium capture: molecules (after capture and diffusion) that fall in each spot's disc."""
    pitch, diameter = 100.0, 55.0
    sx, sy, arow, acol = spot_lattice(tissue.width_um, tissue.height_um, pitch, diameter)
    x, y, g = _captured(
        tissue, tx, efficiency=efficiency, diffusion_um=diffusion_um, ambient=ambient, seed=seed, key="visium"
    )
    dy = pitch * math.sqrt(3) / 2
    margin = diameter / 2 + 2
    n_rows = int(arow.max()) + 1 if len(arow) else 0
    # spot index by (row, col) for the two nearest rows of each molecule
    lut = -np.ones((n_rows + 2, int(acol.max()) + 3 if len(acol) else 1), dtype=np.int64)
    lut[arow, acol] = np.arange(len(arow))
    spot = -np.ones(len(x), dtype=np.int64)
    r_base = np.floor((y - margin) / dy).astype(np.int64)
    for dr in (0, 1):
        r = r_base + dr
        c = np.round((x - margin) / (pitch / 2)).astype(np.int64)
        c += (c - r) % 2 * np.where((x - margin) / (pitch / 2) > c, 1, -1)  # lattice parity: col and row agree
        ok = (r >= 0) & (r < n_rows) & (c >= 0) & (c < lut.shape[1])
        k = np.where(ok, lut[np.clip(r, 0, lut.shape[0] - 1), np.clip(c, 0, lut.shape[1] - 1)], -1)
        hit = (k >= 0) & (np.hypot(x - sx[np.maximum(k, 0)], y - sy[np.maximum(k, 0)]) <= diameter / 2)
        spot = np.where(hit, k, spot)
    m = spot >= 0
    counts = sparse.csr_matrix(
        (np.ones(m.sum(), np.float32), (spot[m], g[m].astype(np.int64))), shape=(len(sx), tx.n_genes)
    )
    counts.sum_duplicates()
    # a spot is under tissue when its disc overlaps the tissue mask
    g_um = tissue.grid_um
    off = np.arange(-diameter / 2, diameter / 2 + g_um, g_um)
    ox, oy = np.meshgrid(off, off)
    disc = ox**2 + oy**2 <= (diameter / 2) ** 2
    ox, oy = ox[disc], oy[disc]
    frac = tissue.lookup(tissue.tissue, sx[:, None] + ox[None, :], sy[:, None] + oy[None, :]).mean(axis=1)
    return SpotLattice(
        x=sx, y=sy, array_row=arow, array_col=acol, in_tissue=frac >= 0.05, counts=counts, diameter_um=diameter
    )


@dataclass
class BinGrid:
    """Visium HD square bins of one size (µm), row-major, with counts for every bin."""

    bin_um: int
    n_rows: int
    n_cols: int
    counts: sparse.csr_matrix  # (n_rows * n_cols) x genes
    in_tissue: np.ndarray  # (n_rows * n_cols,) bool


def capture_bins(
    tissue: Tissue,
    tx: Transcripts,
    bin_sizes: tuple[int, ...],
    *,
    efficiency: float,
    diffusion_um: float = 2.0,
    ambient: float = 0.03,
    seed: int,
) -> dict[int, BinGrid]:
    """Visium HD capture: molecules per 2 µm bin; larger bins are exact sums of their 2 µm bins."""
    x, y, g = _captured(
        tissue, tx, efficiency=efficiency, diffusion_um=diffusion_um, ambient=ambient, seed=seed, key="hd"
    )
    base = 2
    nr2, nc2 = int(tissue.height_um // base), int(tissue.width_um // base)
    ix, iy = np.floor(x / base).astype(np.int64), np.floor(y / base).astype(np.int64)
    ok = (ix >= 0) & (ix < nc2) & (iy >= 0) & (iy < nr2)
    ix, iy, g = ix[ok], iy[ok], g[ok].astype(np.int64)
    # tissue mask per 2 µm bin (the label grid is 2 µm, anchored at the same origin)
    t2 = tissue.tissue[:nr2, :nc2] if tissue.grid_um == base else _resample_mask(tissue, base, nr2, nc2)
    out = {}
    for b in bin_sizes:
        f = b // base
        nr, nc = nr2 // f, nc2 // f
        r, c = iy // f, ix // f
        ok = (r < nr) & (c < nc)
        counts = sparse.csr_matrix(
            (np.ones(ok.sum(), np.float32), (r[ok] * nc + c[ok], g[ok])), shape=(nr * nc, tx.n_genes)
        )
        counts.sum_duplicates()
        mask = t2[: nr * f, : nc * f].reshape(nr, f, nc, f).any(axis=(1, 3)).ravel()
        out[b] = BinGrid(bin_um=b, n_rows=nr, n_cols=nc, counts=counts, in_tissue=mask)
    return out


def _resample_mask(tissue: Tissue, size: float, nr: int, nc: int) -> np.ndarray:
    yy = (np.arange(nr) + 0.5) * size
    xx = (np.arange(nc) + 0.5) * size
    return tissue.lookup(tissue.tissue, xx[None, :], yy[:, None])


# --------------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------------
# Stain optical densities per unit concentration (R, G, B); hematoxylin after Ruifrok & Johnston, eosin a little bluer
# so that eosin reads pink rather than magenta, and haemoglobin for red blood cells.
_OD_H = np.array([0.65, 0.70, 0.29], dtype=np.float32)
_OD_E = np.array([0.07, 0.92, 0.38], dtype=np.float32)
_OD_R = np.array([0.10, 1.10, 0.80], dtype=np.float32)
_OD_GLASS = 0.035


class _Layer:
    """Ellipses (filled or rings) with per-ellipse values and a bucketed spatial index."""

    BIN_UM = 64.0

    def __init__(
        self,
        width: float,
        height: float,
        x,
        y,
        a,
        b,
        phi,
        values: dict[str, np.ndarray],
        ring_um=None,
        opacity=None,
        profile: float = 0.0,
    ):
        self.opacity = None if opacity is None else np.asarray(opacity, np.float32)
        # values fall off towards the rim as 1 - profile * rho^2 (nuclei are domed, not flat discs)
        self.profile = float(profile)
        self.x = np.asarray(x, np.float64)
        self.y = np.asarray(y, np.float64)
        self.a = np.asarray(a, np.float32)
        self.b = np.asarray(b, np.float32)
        self.phi = np.asarray(phi, np.float32)
        self.values = {k: np.asarray(v, np.float32) for k, v in values.items()}
        self.ring = None if ring_um is None else np.asarray(ring_um, np.float32)
        self.reach = float(self.a.max()) if len(self.a) else 0.0
        self.nbx = int(math.ceil(width / self.BIN_UM)) + 1
        self.nby = int(math.ceil(height / self.BIN_UM)) + 1
        bx = np.clip((self.x // self.BIN_UM).astype(np.int64), 0, self.nbx - 1)
        by = np.clip((self.y // self.BIN_UM).astype(np.int64), 0, self.nby - 1)
        key = by * self.nbx + bx
        self.order = np.argsort(key, kind="stable")
        self.starts = np.searchsorted(key[self.order], np.arange(self.nbx * self.nby + 1))
        c, s = np.cos(self.phi), np.sin(self.phi)
        ia, ib = 1 / self.a**2, 1 / self.b**2
        self.q11, self.q12, self.q22 = c * c * ia + s * s * ib, c * s * (ia - ib), s * s * ia + c * c * ib

    def __len__(self) -> int:
        return len(self.x)

    def query(self, x0: float, x1: float, y0: float, y1: float, margin: float) -> np.ndarray:
        """Indices of ellipses whose stamps may reach the box (µm); ``margin`` covers the stamps' soft edges."""
        if not len(self.x):
            return np.zeros(0, np.int64)
        m = self.reach + margin + (0.0 if self.ring is None else float(self.ring.max(initial=0)))
        bx0 = int(np.clip((x0 - m) // self.BIN_UM, 0, self.nbx - 1))
        bx1 = int(np.clip((x1 + m) // self.BIN_UM, 0, self.nbx - 1))
        by0 = int(np.clip((y0 - m) // self.BIN_UM, 0, self.nby - 1))
        by1 = int(np.clip((y1 + m) // self.BIN_UM, 0, self.nby - 1))
        parts = [
            self.order[self.starts[by * self.nbx + bx0] : self.starts[by * self.nbx + bx1 + 1]]
            for by in range(by0, by1 + 1)
        ]
        return np.concatenate(parts)


def _build_layers(tissue: Tissue) -> dict[str, _Layer]:
    c = tissue.cells
    t = c["type"].astype(np.int64)
    w, h = tissue.width_um, tissue.height_um
    adip = t == ADIP
    cyto = _Layer(
        w,
        h,
        c["x"],
        c["y"],
        c["cell_a"],
        c["cell_b"],
        c["angle"],
        {"E": c["eosin"], "H": _M["Hc"][t]},
        opacity=_M["opacity"][t],
    )
    nuclei = _Layer(
        w,
        h,
        c["nuc_x"],
        c["nuc_y"],
        c["nuc_a"],
        c["nuc_b"],
        c["angle"],
        {"H": c["hema"], "E": np.full(len(t), 0.12), "R": np.zeros(len(t)), "T": _M["tex"][t], "D": c["dapi"]},
        profile=0.3,
    )
    n_r = len(tissue.rbc["x"])
    n_a = int(adip.sum())
    extras = _Layer(
        w,
        h,
        np.concatenate([tissue.rbc["x"], c["x"][adip]]),
        np.concatenate([tissue.rbc["y"], c["y"][adip]]),
        np.concatenate([np.full(n_r, 3.6), c["cell_a"][adip]]),
        np.concatenate([np.full(n_r, 3.4), c["cell_b"][adip]]),
        np.concatenate([np.zeros(n_r), c["angle"][adip]]),
        {
            "H": np.concatenate([np.full(n_r, 0.02), np.full(n_a, 0.05)]),
            "E": np.concatenate([np.zeros(n_r), np.full(n_a, 0.75)]),
            "R": np.concatenate([np.full(n_r, 1.1), np.zeros(n_a)]),
            "T": np.zeros(n_r + n_a),
            "D": np.zeros(n_r + n_a),
        },
        ring_um=np.concatenate([np.zeros(n_r), np.full(n_a, 1.4)]),
    )
    return {"cyto": cyto, "nuclei": nuclei, "extras": extras}


def _hash_uniform(rows: np.ndarray, cols: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic per-pixel uniforms from global pixel indices (independent of chunking)."""
    with np.errstate(over="ignore"):
        z = rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + cols.astype(np.uint64) * np.uint64(
            0xC2B2AE3D27D4EB4F
        )
        z += np.uint64(salt & 0xFFFFFFFFFFFF) * np.uint64(0x165667B19E3779F9)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return ((z >> np.uint64(40)).astype(np.float32)) * np.float32(1.0 / (1 << 24))


def _bucket(h: np.ndarray) -> np.ndarray:
    """Round stamp half-sizes up to a short geometric ladder, so that few stamp shapes are needed."""
    ladder = np.unique(np.concatenate([np.arange(1, 9), np.round(8 * 1.2 ** np.arange(1, 30))])).astype(np.int64)
    return ladder[np.minimum(np.searchsorted(ladder, h), len(ladder) - 1)]


def _value_noise(X: np.ndarray, Y: np.ndarray, cell_um: float, salt: int) -> np.ndarray:
    """Smooth noise in [0, 1) with features of ~``cell_um`` µm, a pure function of the position (not the pixel)."""
    u = X.astype(np.float64) / cell_um
    v = Y.astype(np.float64) / cell_um
    j = np.floor(u)
    i = np.floor(v)
    fu = (u - j).astype(np.float32)
    fv = (v - i).astype(np.float32)
    fu = fu * fu * (3 - 2 * fu)
    fv = fv * fv * (3 - 2 * fv)
    i = i.astype(np.int64)
    j = j.astype(np.int64)
    h00 = _hash_uniform(i, j, salt)
    h01 = _hash_uniform(i, j + 1, salt)
    h10 = _hash_uniform(i + 1, j, salt)
    h11 = _hash_uniform(i + 1, j + 1, salt)
    return (h00 + (h01 - h00) * fu) * (1 - fv) + (h10 + (h11 - h10) * fu) * fv


def _splat(
    layer: _Layer,
    idx: np.ndarray,
    affine: np.ndarray,
    inv: np.ndarray,
    r0: int,
    c0: int,
    shape: tuple[int, int],
    edge_px: float,
    keys: tuple[str, ...],
) -> dict[str, np.ndarray]:
    """Accumulate soft-edged ellipse coverage (``"w"``) and coverage-weighted values into a pixel window."""
    hh, ww = shape
    npx = hh * ww
    if not len(idx):
        return {k: np.zeros(npx, np.float32) for k in ("w", *keys)}
    lin = affine[:, :2]
    det = abs(float(np.linalg.det(lin)))
    px_per_um = 1 / float(np.linalg.svd(lin, compute_uv=False).min())
    # centres in pixel coordinates of the window
    cx = inv[0, 0] * layer.x[idx] + inv[0, 1] * layer.y[idx] + inv[0, 2] - c0
    cy = inv[1, 0] * layer.x[idx] + inv[1, 1] * layer.y[idx] + inv[1, 2] - r0
    # quadratic form of each ellipse in pixel units: P = L^T Q L
    q11, q12, q22 = layer.q11[idx], layer.q12[idx], layer.q22[idx]
    l0x, l0y, l1x, l1y = lin[0, 0], lin[1, 0], lin[0, 1], lin[1, 1]
    p00 = q11 * l0x * l0x + 2 * q12 * l0x * l0y + q22 * l0y * l0y
    p11 = q11 * l1x * l1x + 2 * q12 * l1x * l1y + q22 * l1y * l1y
    p01 = q11 * l0x * l1x + q12 * (l0x * l1y + l0y * l1x) + q22 * l0y * l1y
    ring = None if layer.ring is None else layer.ring[idx] * px_per_um
    pad = (0 if ring is None else ring) + 2 * edge_px + 1
    # half extents of the ellipse along the pixel axes
    pdet = np.maximum(p00 * p11 - p01 * p01, 1e-12)
    hx = _bucket(np.ceil(np.sqrt(p11 / pdet) + pad).astype(np.int64))
    hy = _bucket(np.ceil(np.sqrt(p00 / pdet) + pad).astype(np.int64))
    a_um, b_um = layer.a[idx], layer.b[idx]
    area = np.pi * a_um * b_um / det
    if ring is not None:
        perim = np.pi * (3 * (a_um + b_um) - np.sqrt((3 * a_um + b_um) * (a_um + 3 * b_um)))
        area = np.where(ring > 0, perim * layer.ring[idx] / det, area)
    vals = {k: layer.values[k][idx] for k in keys}
    fx_all = np.floor(cx)
    fy_all = np.floor(cy)
    flats, weights, owners, shading = [], [], [], []
    group = hx * 4096 + hy
    for gkey in np.unique(group):
        sel = np.flatnonzero(group == gkey)
        gx, gy = int(gkey // 4096), int(gkey % 4096)
        oy, ox = np.meshgrid(
            np.arange(-gy, gy + 1, dtype=np.float32), np.arange(-gx, gx + 1, dtype=np.float32), indexing="ij"
        )
        oy, ox = oy.ravel(), ox.ravel()
        ix = fx_all[sel, None].astype(np.float32) + ox[None, :]
        iy = fy_all[sel, None].astype(np.float32) + oy[None, :]
        dx = ix + np.float32(0.5) - cx[sel, None].astype(np.float32)
        dy = iy + np.float32(0.5) - cy[sel, None].astype(np.float32)
        d2 = dx * dx
        q = p00[sel, None] * d2
        d2 += dy * dy
        q += p11[sel, None] * (dy * dy) + (2 * p01[sel, None]) * (dx * dy)
        # signed distance to the boundary along the ray from the centre: |d| (1 - 1 / rho)
        with np.errstate(divide="ignore", invalid="ignore"):
            signed = np.sqrt(d2) - np.sqrt(d2 / q)
        signed[q < 1e-12] = -1e3
        if ring is not None:
            rg = ring[sel, None]
            signed = np.where(rg > 0, np.abs(signed) - rg / 2, signed)
        cov = np.clip(np.float32(0.5) - signed * np.float32(1 / edge_px), 0, 1)
        total = cov.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            fix = np.where(total > area[sel], area[sel] / total, 1.0).astype(np.float32)
        if layer.opacity is not None:
            fix *= layer.opacity[idx[sel]]
        cov *= fix[:, None]
        inb = (ix >= 0) & (ix < ww) & (iy >= 0) & (iy < hh) & (cov > 0)
        flats.append((iy[inb] * ww + ix[inb]).astype(np.int64))
        weights.append(cov[inb])
        owners.append(np.broadcast_to(sel[:, None], cov.shape)[inb])
        shading.append(1 - layer.profile * np.minimum(q[inb], 1) if layer.profile else None)
    flat = np.concatenate(flats)
    wts = np.concatenate(weights)
    own = np.concatenate(owners)
    out = {"w": np.bincount(flat, wts, npx)}
    if layer.profile:
        wts = wts * np.concatenate(shading)
    for k in keys:
        out[k] = np.bincount(flat, wts * vals[k][own], npx)
    return out


def _axis_weights(u: np.ndarray, n: int) -> sparse.csr_matrix:
    """Linear-interpolation matrix from ``n`` lattice nodes to positions ``u`` (lattice units, clamped)."""
    return _interp_matrix(np.asarray(u, np.float64), n)


class _Sampler:
    """Bilinear sampling of lattices at the pixels of a window: separable when the image is axis-aligned."""

    def __init__(self, X: np.ndarray, Y: np.ndarray, axis_aligned: bool) -> None:
        self.X, self.Y = X, Y
        self.aligned = axis_aligned
        self.xs = X[0, :].astype(np.float64) if axis_aligned else None
        self.ys = Y[:, 0].astype(np.float64) if axis_aligned else None

    def lattice(self, values: np.ndarray, origin: float, step: float, scale: float = 1.0) -> np.ndarray:
        """Sample ``values`` (node ``k`` at ``origin + k * step`` µm) at the pixels, times ``scale``."""
        if self.aligned:
            ux = (self.xs - origin) / step
            uy = (self.ys - origin) / step
            ny, nx = values.shape
            j0 = int(np.clip(np.floor(ux.min()) - 1, 0, nx - 1))
            j1 = int(np.clip(np.ceil(ux.max()) + 2, j0 + 1, nx))
            i0 = int(np.clip(np.floor(uy.min()) - 1, 0, ny - 1))
            i1 = int(np.clip(np.ceil(uy.max()) + 2, i0 + 1, ny))
            win = values[i0:i1, j0:j1].astype(np.float32) * np.float32(scale)
            if win.shape[0] == 1:
                win = np.vstack([win, win])
            if win.shape[1] == 1:
                win = np.hstack([win, win])
            wy = _axis_weights(uy - i0, win.shape[0])
            wx = _axis_weights(ux - j0, win.shape[1])
            return np.ascontiguousarray((wx @ (wy @ win).T).T, dtype=np.float32)
        gx = (self.X - origin) / step
        gy = (self.Y - origin) / step
        ny, nx = values.shape
        j0 = int(np.clip(np.floor(gx.min()) - 1, 0, nx - 1))
        j1 = int(np.clip(np.ceil(gx.max()) + 2, 1, nx))
        i0 = int(np.clip(np.floor(gy.min()) - 1, 0, ny - 1))
        i1 = int(np.clip(np.ceil(gy.max()) + 2, 1, ny))
        win = values[i0:i1, j0:j1].astype(np.float32) * np.float32(scale)
        coords = np.stack([(gy - i0).ravel(), (gx - j0).ravel()])
        return ndimage.map_coordinates(win, coords, order=1, mode="nearest").reshape(self.X.shape)

    def grid(self, grid: np.ndarray, g: float) -> np.ndarray:
        """A uint8 label grid (cell ``(i, j)`` centred at ``((j + 0.5) g, (i + 0.5) g)``) as 0-1 values."""
        return self.lattice(grid, g / 2, g, 1 / 255)

    def field(self, f: _Field) -> np.ndarray:
        return self.lattice(f.values, f.origin, f.step)


def render(
    tissue: Tissue,
    kind: Literal["he", "dapi"],
    affine: np.ndarray,
    rows: tuple[int, int],
    cols: tuple[int, int],
    *,
    salt: int = 0,
) -> np.ndarray:
    """Render pixels ``rows`` x ``cols`` of an image whose pixel coordinates map to µm through ``affine``.

    Parameters
    ----------
    tissue
        The tissue.
    kind
        ``"he"``: RGB uint8 H&E (3, h, w); ``"dapi"``: uint16 DAPI (1, h, w).
    affine
        2 x 3 matrix from continuous pixel coordinates (x = column, y = row; pixel ``j`` covers ``[j, j + 1)``) to µm.
    rows, cols
        Half-open pixel ranges of the window.
    salt
        Mixed into the pixel noise (e.g. the pyramid level), so that levels do not share noise.

    Returns
    -------
    The pixels; they depend only on the tissue, the affine and the pixel indices, not on the window.

    """
    affine = np.asarray(affine, dtype=np.float64)[:2]
    full = np.vstack([affine, [0, 0, 1]])
    inv = np.linalg.inv(full)[:2]
    r0, r1 = rows
    c0, c1 = cols
    hh, ww = r1 - r0, c1 - c0
    px_um = float(np.sqrt(abs(np.linalg.det(affine[:, :2]))))
    rr = np.arange(r0, r1, dtype=np.float64) + 0.5
    cc = np.arange(c0, c1, dtype=np.float64) + 0.5
    X = (affine[0, 0] * cc[None, :] + affine[0, 1] * rr[:, None] + affine[0, 2]).astype(np.float32)
    Y = (affine[1, 0] * cc[None, :] + affine[1, 1] * rr[:, None] + affine[1, 2]).astype(np.float32)
    corners_x = [X[0, 0], X[0, -1], X[-1, 0], X[-1, -1]]
    corners_y = [Y[0, 0], Y[0, -1], Y[-1, 0], Y[-1, -1]]
    bx0, bx1 = min(corners_x) - px_um, max(corners_x) + px_um
    by0, by1 = min(corners_y) - px_um, max(corners_y) + px_um
    w, h = tissue.width_um, tissue.height_um
    on_field = bx1 >= 0 and by1 >= 0 and bx0 <= w and by0 <= h
    g = tissue.grid_um
    # blur: optics (~0.35 µm) combined with the pixel footprint
    edge_px = float(np.sqrt(0.8**2 + (0.35 / px_um) ** 2))
    px_max = float(np.linalg.svd(affine[:, :2], compute_uv=False).max())
    margin = (2 * edge_px + 3) * px_max
    gr = (np.arange(r0, r1, dtype=np.int64)[:, None] * np.ones((1, ww), np.int64)).ravel()
    gc = (np.ones((hh, 1), np.int64) * np.arange(c0, c1, dtype=np.int64)[None, :]).ravel()
    noise1 = _hash_uniform(gr, gc, salt * 7919 + tissue.seed * 104729 + 1).reshape(hh, ww)
    noise2 = _hash_uniform(gr, gc, salt * 7919 + tissue.seed * 104729 + 2).reshape(hh, ww)
    del gr, gc
    inside = (X >= 0) & (X < w) & (Y >= 0) & (Y < h)
    sampler = _Sampler(X, Y, affine[0, 1] == 0 and affine[1, 0] == 0)
    if on_field:
        ta = sampler.grid(tissue.alpha, g) * inside
    else:
        ta = np.zeros((hh, ww), np.float32)
    layers = tissue.layers
    # detail finer than ~2 pixels cannot show: fade textures at coarse resolution
    tex_gain = float(np.clip((1.5 - px_um) / 1.0, 0.15, 1.0))
    # chromatin: clumps of ~0.7 µm, the same at every resolution and in every chunk
    chromatin = _value_noise(X, Y, 0.7, tissue.seed * 7 + 11) if px_um < 1.5 else np.full(X.shape, 0.5, np.float32)

    if kind == "dapi":
        img = np.float32(0.004) + ta * np.float32(0.010)
        if on_field:
            idx = layers["nuclei"].query(bx0, bx1, by0, by1, margin)
            acc = _splat(layers["nuclei"], idx, affine, inv, r0, c0, (hh, ww), edge_px, ("D", "T"))
            wsum = acc["w"].reshape(hh, ww)
            cov = np.minimum(wsum, 1)
            inv_w = 1 / np.maximum(wsum, 1e-6)
            tex = acc["T"].reshape(hh, ww) * inv_w * tex_gain
            nuc = acc["D"].reshape(hh, ww) * inv_w * (1 + 1.2 * tex * (chromatin - 0.5))
            img = img * (1 - cov) + cov * nuc
        counts = img * 65535
        counts = counts + np.sqrt(counts) * 1.2 * (noise2 - 0.5) * 3.4 + 40 * (noise1 - 0.5)
        return np.clip(counts, 0, 65535).astype(np.uint16)[None]

    # --- H&E: stain concentrations of the extracellular background, then cytoplasm, then nuclei on top ---
    if on_field:
        e_bg = sampler.grid(tissue.bg_e, g) * np.float32(255 / 200)
        fib = sampler.grid(tissue.fibre, g)
        f = tissue.fields
        # fibres: contour lines of a smooth field, ~7 µm apart on average, wavy and broken
        fibre = sampler.field(f["fibre"])
        warp = sampler.field(f["fibre_warp"])
        psi1 = 14.0 * fibre + 0.35 * warp
        psi2 = 23.0 * fibre - 0.5 * warp
        stripes = 0.6 * (0.5 + 0.5 * np.cos(psi1 * np.float32(2 * np.pi))) ** 4
        stripes += 0.4 * (0.5 + 0.5 * np.cos(psi2 * np.float32(2 * np.pi))) ** 6
        broken = np.clip(0.5 + 0.7 * sampler.field(f["fibre_break"]), 0, 1)
        fibre_gain = float(np.clip((7.0 / px_um - 2.0) / 2.0, 0.0, 1.0))
        texture = 0.22 + fibre_gain * (stripes * broken - 0.22)
        E = ta * e_bg * (1 + fib * (0.9 * texture - 0.2))
        H = ta * np.float32(0.05)
        R = np.zeros_like(E)
        idx = layers["cyto"].query(bx0, bx1, by0, by1, margin)
        acc = _splat(layers["cyto"], idx, affine, inv, r0, c0, (hh, ww), edge_px, ("E", "H"))
        wsum = acc["w"].reshape(hh, ww)
        cov = np.minimum(wsum, 1)
        inv_w = 1 / np.maximum(wsum, 1e-6)
        E = E * (1 - cov) + cov * acc["E"].reshape(hh, ww) * inv_w
        H = H * (1 - cov) + cov * acc["H"].reshape(hh, ww) * inv_w
        for name in ("nuclei", "extras"):
            idx = layers[name].query(bx0, bx1, by0, by1, margin)
            acc = _splat(layers[name], idx, affine, inv, r0, c0, (hh, ww), edge_px, ("H", "E", "R", "T"))
            wsum = acc["w"].reshape(hh, ww)
            cov = np.minimum(wsum, 1)
            inv_w = 1 / np.maximum(wsum, 1e-6)
            tex = acc["T"].reshape(hh, ww) * inv_w * tex_gain
            Hn = acc["H"].reshape(hh, ww) * inv_w * (1 + 1.4 * tex * (chromatin - 0.5))
            H = H * (1 - cov) + cov * Hn
            E = E * (1 - cov) + cov * acc["E"].reshape(hh, ww) * inv_w
            R = R * (1 - cov) + cov * acc["R"].reshape(hh, ww) * inv_w
        # slide-scale staining variation
        H *= 1 + 0.07 * sampler.field(f["stain_h"])
        E *= 1 + 0.07 * sampler.field(f["stain_e"])
    else:
        E = H = R = np.zeros((hh, ww), np.float32)
    out = np.empty((3, hh, ww), np.uint8)
    jitter = 1 + 0.03 * (noise2 - 0.5)
    for ch in range(3):
        od = _OD_GLASS + H * _OD_H[ch] + E * _OD_E[ch] + R * _OD_R[ch]
        out[ch] = np.clip(255 * np.exp(-od) * jitter, 0, 255).astype(np.uint8)
    return out
