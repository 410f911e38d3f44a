"""``dst.pl.benchmark``: methods × metrics from a benchmark table, best method per metric highlighted."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from ._utils import check_save, figure_of, finish, pyplot

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# substrings of metric names, in the order they are tried; the first that matches decides
_DIRECTION = (
    ("consistency", False),
    ("rmse", False),
    ("mse", False),
    ("mae", False),
    ("error", False),
    ("loss", False),
    ("pcc", True),
    ("pearson", True),
    ("spearman", True),
    ("corr", True),
    ("ssim", True),
    ("psnr", True),
)
_MAX_ANNOTATED_BARS = 12


def benchmark(
    df: pd.DataFrame,
    *,
    metrics: str | Sequence[str] = ("pcc", "rmse"),
    method_col: str = "method",
    group_col: str | None = None,
    error_col: str | None = "std",
    metric_col: str = "metric",
    value_col: str = "value",
    higher_is_better: Mapping[str, bool] | None = None,
    kind: Literal["bar", "dot"] = "bar",
    order: Sequence[str] | None = None,
    axes: Axes | Sequence[Axes] | None = None,
    panel_size: float = 3.0,
    show: bool = False,
    save: str | Path | None = None,
) -> Figure:
    """Compare methods on benchmark metrics, one panel per metric, the best method of each marked.

    The table may be **wide** (one column per metric, e.g. what ``dst.tl.evaluate`` gives per method) or **long**:

    - wide: columns ``method_col``, the ``metrics`` (``pcc``, ``rmse`` …), optional spread columns
      ``{metric}_{error_col}`` (``pcc_std``) and optional ``group_col`` (``scale``, ``dataset``);
    - long: columns ``method_col``, ``metric_col`` (``"metric"``), ``value_col`` (``"value"``), optional ``error_col``
      (``"std"``) and optional ``group_col``.

    A table is read as long when it has both ``metric_col`` and ``value_col``. When a method (in a group) has several
    rows, for example one per gene or tile, they are averaged (NaN ignored) and their standard deviation is the error
    bar. Tables of :func:`diffst.tl.evaluate` concatenated over methods (``pd.concat([...])``: indexed by ``gene``,
    a ``method`` column) are read as they are; their ``"mean"`` rows are dropped in favour of the per-gene rows.

    Parameters
    ----------
    df
        The benchmark table.
    metrics
        Metrics to show, one panel each.
    method_col
        Column with the method names (``"diffst"``, ``"bicubic"`` …).
    group_col
        Column that splits the comparison (``"scale"``, ``"dataset"``): methods side by side within each group, the
        best marked per group. ``None``: one bar per method.
    error_col
        Suffix of the spread columns of a wide table (``"std"`` → ``pcc_std``) or the spread column of a long one; drawn
        as error bars when present. ``None`` draws none.
    metric_col, value_col
        Metric-name and value columns of a long table.
    higher_is_better
        Direction per metric, overriding the built-in one: higher is better for PCC/Pearson/Spearman/SSIM/PSNR, lower
        for RMSE/MSE/MAE/LR consistency/errors. A metric with no known direction is drawn without a best mark.
    kind
        ``"bar"`` or ``"dot"`` (means with error bars, easier to read for close values).
    order
        Order of the methods (by default as they first appear in the table); also fixes their colours.
    axes
        Axes to draw into, one per metric; by default a new figure with the panels side by side.
    panel_size
        Width of one panel in inches, for a new figure.
    show
        Show the figure (``plt.show()``); in a notebook the returned figure is shown anyway.
    save
        Also write the figure to this file (PNG, PDF, SVG … from the suffix; 150 dpi for raster formats).

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` holding the panels. The best bar (or dot) of each metric and group has a
    thick black outline and a ★.

    Examples
    --------
    >>> table = pd.DataFrame(
    ...     {"method": ["diffst", "bicubic"], "pcc": [0.61, 0.42], "pcc_std": [0.05, 0.04], "rmse": [0.21, 0.27]}
    ... )
    >>> dst.pl.benchmark(table)  # doctest: +SKIP

    """
    save_path = check_save(save)
    if kind not in ("bar", "dot"):
        msg = f"`kind` must be 'bar' or 'dot'; got {kind!r}."
        raise ValueError(msg)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not metrics:
        msg = "`metrics` is empty; pass one or more metric names."
        raise ValueError(msg)
    long = _to_long(df, metrics, method_col, group_col, error_col, metric_col, value_col)
    table = _summarise(long)
    methods = _method_order(long, order)
    groups = list(dict.fromkeys(long["group"]))

    if axes is None:
        width = panel_size * max(1.0, 0.35 * len(methods) * len(groups) / 3 + 0.5)
        fig = pyplot().figure(figsize=(width * len(metrics), panel_size * 0.9 + 0.4), layout="constrained")
        ax_list = list(fig.subplots(1, len(metrics), squeeze=False)[0])
    else:
        ax_list = list(np.ravel(np.asarray(axes, dtype=object)))
        if len(ax_list) != len(metrics):
            msg = f"`axes` has {len(ax_list)} axes but there are {len(metrics)} metrics ({metrics})."
            raise ValueError(msg)
        fig = figure_of(ax_list)

    colors = pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    n_m = len(methods)
    width = 0.8 / n_m
    annotate = kind == "bar" and n_m * len(groups) <= _MAX_ANNOTATED_BARS
    for ax, metric in zip(ax_list, metrics, strict=True):
        higher = _direction(metric, higher_is_better)
        part = table[table["metric"] == metric].set_index(["method", "group"])
        best = _best(part, higher)
        for k, method in enumerate(methods):
            xs = np.arange(len(groups)) + (k - (n_m - 1) / 2) * width
            vals = np.array([part["value"].get((method, g), np.nan) for g in groups], dtype=float)
            errs = np.array([part["err"].get((method, g), np.nan) for g in groups], dtype=float)
            is_best = [(method, g) in best for g in groups]
            yerr = None if np.all(np.isnan(errs)) else np.nan_to_num(errs)
            color = colors[k % len(colors)]
            if kind == "bar":
                bars = ax.bar(xs, vals, width * 0.9, yerr=yerr, color=color, label=method, capsize=2, ecolor="0.3")
                for patch, b in zip(bars.patches, is_best, strict=True):
                    if b:
                        patch.set(edgecolor="black", linewidth=2.0, gid="best")
            else:
                if yerr is not None:
                    ax.errorbar(xs, vals, yerr=yerr, fmt="none", ecolor=color, capsize=2, lw=1)
                ax.plot(xs, vals, "o", color=color, ms=7, label=method, gid=method)
                bx = xs[np.asarray(is_best, dtype=bool)]
                if bx.size:
                    by = vals[np.asarray(is_best, dtype=bool)]
                    ax.plot(bx, by, "o", ms=11, mfc="none", mec="black", mew=2, gid=f"best:{method}")
            for x, v, e, b in zip(xs, vals, errs, is_best, strict=True):
                if not np.isfinite(v):
                    continue
                top = v + (e if np.isfinite(e) else 0.0) if v >= 0 else v - (e if np.isfinite(e) else 0.0)
                text = "\n".join(t for t in ("★" if b else "", f"{v:.3g}" if annotate else "") if t)
                if text:
                    ax.annotate(
                        text,
                        (x, top),
                        xytext=(0, 2 if v >= 0 else -2),
                        textcoords="offset points",
                        ha="center",
                        va="bottom" if v >= 0 else "top",
                        fontsize="x-small",
                        fontweight="bold" if b else "normal",
                    )
        arrow = "" if higher is None else (" ↑ (higher is better)" if higher else " ↓ (lower is better)")
        ax.set_title(metric + arrow, fontsize="medium")
        ax.set_ylabel(metric)
        ax.margins(y=0.18)
        if kind == "bar" and np.nanmin(part["value"].to_numpy(dtype=float), initial=0.0) >= 0:
            ax.set_ylim(bottom=0)
        vals_all = part["value"].to_numpy(dtype=float)
        if kind == "bar" or (np.nanmin(vals_all, initial=0.0) < 0 < np.nanmax(vals_all, initial=0.0)):
            ax.axhline(0, color="0.5", lw=0.6)  # dots of close values need not show zero
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        if group_col is None:
            ax.set_xticks(np.arange(len(groups)) + (np.arange(n_m) - (n_m - 1) / 2) * width, methods)
            ax.tick_params(axis="x", labelrotation=30 if max(len(m) for m in methods) > 8 else 0)
        else:
            ax.set_xticks(np.arange(len(groups)), [str(g) for g in groups])
            ax.set_xlabel(group_col)
    if group_col is not None:
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        # proxies: the first bar of a method may carry the best-mark outline, which is not the method's look
        handles = [
            Patch(facecolor=colors[k % len(colors)], label=m)
            if kind == "bar"
            else Line2D([], [], marker="o", ls="none", color=colors[k % len(colors)], label=m)
            for k, m in enumerate(methods)
        ]
        ax_list[-1].legend(
            handles=handles,
            title=method_col,
            fontsize="small",
            frameon=False,
            loc="center left",
            bbox_to_anchor=(1, 0.5),
        )
    return finish(fig, show=show, save=save_path)


def _to_long(
    df: pd.DataFrame,
    metrics: list[str],
    method_col: str,
    group_col: str | None,
    error_col: str | None,
    metric_col: str,
    value_col: str,
) -> pd.DataFrame:
    """Columns ``method, group, metric, value, err`` (``err`` NaN where there is no spread)."""
    if not isinstance(df, pd.DataFrame):
        msg = f"`df` must be a pandas DataFrame; got {type(df).__name__}."
        raise TypeError(msg)
    if df.index.name == "gene":  # dst.tl.evaluate tables: per-gene rows and their "mean" row, which would count twice
        df = df[df.index.astype(str) != "mean"]
    df = df.reset_index() if method_col not in df.columns and df.index.name == method_col else df
    for col, what in ((method_col, "method_col"), (group_col, "group_col")):
        if col is not None and col not in df.columns:
            msg = f"The benchmark table has no column {col!r} (`{what}`); it has {list(df.columns)}."
            raise KeyError(msg)
    group = df[group_col] if group_col is not None else pd.Series("", index=df.index)
    if metric_col in df.columns and value_col in df.columns:
        present = list(dict.fromkeys(df[metric_col].astype(str)))
        missing = [m for m in metrics if m not in present]
        if missing:
            msg = f"Metrics {missing} are not in column {metric_col!r} of the benchmark table; it has {present}."
            raise KeyError(msg)
        err = df[error_col] if error_col is not None and error_col in df.columns else np.nan
        out = pd.DataFrame(
            {
                "method": df[method_col].astype(str),
                "group": group,
                "metric": df[metric_col].astype(str),
                "value": pd.to_numeric(df[value_col], errors="coerce"),
                "err": err,
            }
        )
        return out[out["metric"].isin(metrics)].reset_index(drop=True)
    missing = [m for m in metrics if m not in df.columns]
    if missing:
        numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])]
        msg = (
            f"Metrics {missing} are not columns of the benchmark table (wide form), and it has no "
            f"{metric_col!r}/{value_col!r} columns (long form). Numeric columns: {numeric}."
        )
        raise KeyError(msg)
    parts = []
    for m in metrics:
        e = f"{m}_{error_col}" if error_col is not None else None
        parts.append(
            pd.DataFrame(
                {
                    "method": df[method_col].astype(str),
                    "group": group,
                    "metric": m,
                    "value": pd.to_numeric(df[m], errors="coerce"),
                    "err": pd.to_numeric(df[e], errors="coerce") if e is not None and e in df.columns else np.nan,
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def _summarise(long: pd.DataFrame) -> pd.DataFrame:
    """One row per method, group and metric; several rows are averaged with their std as the spread."""
    keys = ["method", "group", "metric"]
    grouped = long.groupby(keys, sort=False, dropna=False)
    n = grouped["value"].transform("size")
    single = long[n == 1]
    multi = long[n > 1]
    parts = [single[[*keys, "value", "err"]]]
    if not multi.empty:
        agg = multi.groupby(keys, sort=False, dropna=False)["value"].agg(value="mean", err="std").reset_index()
        parts.append(agg)
    return pd.concat(parts, ignore_index=True)


def _method_order(long: pd.DataFrame, order: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(long["method"]))
    if order is None:
        return present
    order = [str(m) for m in order]
    unknown = [m for m in order if m not in present]
    if unknown:
        msg = f"Methods {unknown} in `order` are not in the benchmark table; it has {present}."
        raise KeyError(msg)
    return order


def _direction(metric: str, override: Mapping[str, bool] | None) -> bool | None:
    if override is not None and metric in override:
        return bool(override[metric])
    name = metric.lower()
    for token, higher in _DIRECTION:
        if token in name:
            return higher
    return None


def _best(part: pd.DataFrame, higher: bool | None) -> set[tuple[str, object]]:
    """``(method, group)`` pairs with the best value of their group (ties all count)."""
    if higher is None or part.empty:
        return set()
    best = set()
    values = part["value"].astype(float)
    for g, sub in values.groupby(level="group", sort=False):
        sub = sub.dropna()
        if sub.empty:
            continue
        target = sub.max() if higher else sub.min()
        best |= {(m, g) for (m, _), v in sub.items() if np.isclose(v, target, rtol=1e-12, atol=0)}
    return best
