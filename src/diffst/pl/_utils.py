"""Small helpers shared by the plots."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def pyplot() -> Any:
    """``matplotlib.pyplot``, imported on first use so ``import diffst`` does not pick a backend."""
    import matplotlib.pyplot as plt

    return plt


def nice_length(target: float) -> float:
    """The round length (1, 2 or 5 × 10^k) closest to ``target`` on a log scale."""
    if not np.isfinite(target) or target <= 0:
        msg = f"Cannot choose a scale bar length for a width of {target!r}."
        raise ValueError(msg)
    exp = np.floor(np.log10(target))
    candidates = np.array([1.0, 2.0, 5.0, 10.0]) * 10.0**exp
    return float(candidates[np.argmin(np.abs(np.log(candidates / target)))])


def add_scale_bar(ax: Axes, length_um: float, *, loc: str = "lower left") -> Any:
    """A labelled scale bar of ``length_um`` on an axes whose data units are µm; returns the artist."""
    from matplotlib.font_manager import FontProperties
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    x0, x1 = ax.get_xlim()
    y_span = abs(ax.get_ylim()[1] - ax.get_ylim()[0])
    bar = AnchoredSizeBar(
        ax.transData,
        length_um,
        f"{length_um:g} µm",
        loc,
        pad=0.3,
        borderpad=0.4,
        sep=2,
        color="black",
        frameon=True,
        size_vertical=0.015 * y_span,
        fontproperties=FontProperties(size="x-small"),
    )
    bar.patch.set(facecolor="white", alpha=0.75, edgecolor="none")
    bar.set_gid("scale_bar")
    ax.add_artist(bar)
    return bar


def figure_of(axes: Any) -> Figure:
    """The figure an axes (or the first of several) belongs to."""
    first = np.ravel(np.asarray(axes, dtype=object))[0]
    try:
        return first.get_figure(root=True)
    except TypeError:  # matplotlib < 3.10 has no `root`
        return first.figure


def check_save(save: str | Path | None) -> Path | None:
    """The path ``save=`` names, checked before anything is drawn (its folder must exist)."""
    if save is None:
        return None
    path = Path(save).expanduser()
    if not path.parent.exists():
        msg = f"Cannot save the figure to {str(path)!r}: the folder {str(path.parent)!r} does not exist."
        raise FileNotFoundError(msg)
    return path


def finish(fig: Figure, *, show: bool, save: Path | None, dpi: float = 150) -> Figure:
    """Save the figure (the format from the suffix) and show it (``plt.show()``) when asked; return it."""
    if save is not None:
        fig.savefig(save, dpi=dpi, bbox_inches="tight")
    if show:
        pyplot().show()
    return fig
