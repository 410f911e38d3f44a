"""The gene panel and Xenium's control probes.

Real marker symbols from a catalogue (package data ``catalogue.tsv``) with per-type programmes, co-expression modules,
gradients and housekeeping genes.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from typing import TYPE_CHECKING

import numpy as np

from ._common import _ABBREV, _M, CELL_TYPES, MODULES, _rng

if TYPE_CHECKING:
    from .tissue import Tissue

# The gene catalogue, in panel order: the first 50 lines are the default panel (markers of every type, one or two
# genes of each module, housekeeping and gradient genes); the rest is interleaved by group (see `_catalogue`).
# Columns: symbol, per-type log fold changes ("-" none), module loadings ("-" none), flags (hk: housekeeping,
# grad: follows a tissue-wide spatial gradient).
_CATALOGUE = files(__package__).joinpath("catalogue.tsv").read_text(encoding="utf-8")
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
