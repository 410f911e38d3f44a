"""``dst.pl.training_history``: losses and validation metrics per epoch of a trained model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ._utils import check_save, figure_of, finish, pyplot

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..tl import DiffST

_DEFAULT_METRICS = ("train_loss", "val_loss", "val_pcc")
_LABELS = {
    "train_loss": "training",
    "val_loss": "validation",
    "val_pcc": "validation PCC",
    "val_ssim": "validation SSIM",
    "val_rmse": "validation RMSE",
}


def training_history(
    model_or_history: DiffST | Sequence[Mapping[str, Any]] | pd.DataFrame,
    *,
    metrics: Sequence[str] = _DEFAULT_METRICS,
    reference: str | None = "bicubic",
    x: str = "epoch",
    axes: Axes | Sequence[Axes] | None = None,
    panel_size: float = 3.5,
    show: bool = False,
    save: str | Path | None = None,
) -> Figure:
    """Training and validation curves of a Diff-ST model.

    Metrics whose name contains ``"loss"`` share one panel on a log scale (linear if a value is not positive); every
    other metric (``val_pcc``, …) gets its own panel, with the same metric of a baseline, ``{metric}_{reference}``
    (``val_pcc_bicubic``: bicubic upsampling of LR on the validation tiles), as a dashed reference line when the
    history has it. Epochs without a value of a metric (validation every few epochs) are skipped for that metric.

    Parameters
    ----------
    model_or_history
        A :class:`diffst.DiffST` (its ``history``), a list of per-epoch dicts, or a DataFrame with one row per epoch.
    metrics
        Columns of the history to draw. With the default, those of ``train_loss``, ``val_loss``, ``val_pcc`` that the
        history has are drawn; a metric asked for explicitly must be there.
    reference
        Suffix of the reference columns (``"bicubic"`` → ``val_pcc_bicubic``); ``None`` draws none.
    x
        Column on the x axis: ``"epoch"`` (as recorded, from 0) or ``"step"``.
    axes
        Axes to draw into, one per panel (the loss panel first, then the other metrics in order); by default a new
        figure with the panels side by side.
    panel_size
        Width of one panel in inches, for a new figure.
    show
        Show the figure (``plt.show()``); in a notebook the returned figure is shown anyway.
    save
        Also write the figure to this file (PNG, PDF, SVG … from the suffix; 150 dpi for raster formats).

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` holding the panels.

    Examples
    --------
    >>> model = dst.tl.train(sdata)  # doctest: +SKIP
    >>> dst.pl.training_history(model)  # doctest: +SKIP

    """
    save_path = check_save(save)
    df = _history_frame(model_or_history)
    if x not in df.columns:
        msg = f"The history has no column {x!r} for the x axis; it has {list(df.columns)}."
        raise KeyError(msg)
    metrics = _check_metrics(df, metrics, x)
    losses = [m for m in metrics if "loss" in m]
    others = [m for m in metrics if "loss" not in m]
    panels: list[list[str]] = ([losses] if losses else []) + [[m] for m in others]

    if axes is None:
        fig = pyplot().figure(figsize=(panel_size * len(panels), panel_size * 0.8), layout="constrained")
        ax_list = list(fig.subplots(1, len(panels), squeeze=False)[0])
    else:
        ax_list = list(np.ravel(np.asarray(axes, dtype=object)))
        if len(ax_list) != len(panels):
            msg = f"`axes` has {len(ax_list)} axes but the plot has {len(panels)} panels ({panels})."
            raise ValueError(msg)
        fig = figure_of(ax_list)

    colors = pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, names in zip(ax_list, panels, strict=True):
        is_loss = "loss" in names[0]
        positive = True
        for name in names:
            xs, ys = _series(df, x, name)
            positive &= bool(np.all(ys > 0))
            color = colors[metrics.index(name) % len(colors)]
            label = _LABELS.get(name, name) if is_loss else "model"
            ax.plot(xs, ys, color=color, marker="o" if len(xs) < 30 else None, ms=3, label=label, gid=name)
            ref = f"{name}_{reference}" if reference else None
            if ref and ref in df.columns and not is_loss:
                rx, ry = _series(df, x, ref)
                ax.plot(rx, ry, color=color, ls="--", lw=1.2, label=reference, gid=ref)
        if is_loss:
            ax.set_yscale("log" if positive else "linear")
            ax.set_title("loss", fontsize="medium")
            ax.set_ylabel("loss" + (" (log scale)" if positive else ""))
        else:
            ax.set_title(_LABELS.get(names[0], names[0]), fontsize="medium")
            ax.set_ylabel(names[0])
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize="small", frameon=False)
    return finish(fig, show=show, save=save_path)


def _history_frame(obj: Any) -> pd.DataFrame:
    history = getattr(obj, "history", obj)
    if isinstance(history, pd.DataFrame):
        df = history.copy()
    else:
        try:
            df = pd.DataFrame(list(history))
        except (TypeError, ValueError):
            msg = (
                "`model_or_history` must be a DiffST model, a list of per-epoch dicts or a DataFrame; "
                f"got {type(obj).__name__}."
            )
            raise TypeError(msg) from None
    if df.empty:
        msg = "The training history is empty: the model was not trained for a full epoch (or was loaded without it)."
        raise ValueError(msg)
    return df


def _check_metrics(df: pd.DataFrame, metrics: Sequence[str], x: str) -> list[str]:
    if isinstance(metrics, str):
        metrics = [metrics]
    available = [c for c in df.columns if c not in ("epoch", "step", x) and pd.api.types.is_numeric_dtype(df[c])]
    if tuple(metrics) == _DEFAULT_METRICS:
        present = [m for m in metrics if m in df.columns]
        if not present:
            msg = f"The history has none of {list(_DEFAULT_METRICS)}; pass `metrics` from {available}."
            raise KeyError(msg)
        return present
    missing = [m for m in metrics if m not in df.columns]
    if missing:
        msg = f"Metrics {missing} are not in the training history; it has {available}."
        raise KeyError(msg)
    if not metrics:
        msg = f"`metrics` is empty; pass one or more of {available}."
        raise ValueError(msg)
    return list(metrics)


def _series(df: pd.DataFrame, x: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    part = df[[x, name]].apply(pd.to_numeric, errors="coerce").dropna()
    return part[x].to_numpy(dtype=float), part[name].to_numpy(dtype=float)
