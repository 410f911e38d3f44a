"""``diffst demo``: the whole workflow on built-in data, Diff-ST beside bicubic up-sampling, in a few minutes."""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from . import _logging as log
from ._contract import read_record

if TYPE_CHECKING:
    import pandas as pd
    from spatialdata import SpatialData

__all__ = ["run_demo"]

Dataset = Literal["synthetic", "merfish"]

#: What a demo writes into ``out``; a folder holding any of them holds an earlier demo.
OUTPUTS = {
    "zarr": "demo.zarr",
    "figure": "gene_maps.png",
    "training_figure": "training.png",
    "metrics_csv": "metrics.csv",
    "model_dir": "model",
}

#: Wall-clock cap of the full demo's training. The default preset's own budget (about 750 optimiser steps) takes about
#: 5 minutes on a 2-core CPU; on a slower machine the cap ends training (the best validation checkpoint is kept) so
#: that the whole demo stays within about 10 minutes.
FULL_TRAIN_MINUTES = 6.0

KEY = "diffst"
SR_KEY = "diffst_sr"
BICUBIC_KEY = "bicubic_sr"
FLOOR_KEY = "image_floor_sr"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run (all physical sizes in µm)."""

    dataset: str
    description: str
    prepare: dict[str, Any]
    preset: str
    n_samples: int
    max_epochs: int | None = None
    train_minutes: float | None = None
    data: dict[str, Any] = field(default_factory=dict)


def demo_settings(dataset: Dataset = "synthetic", *, quick: bool = False) -> DemoSettings:
    """The settings ``run_demo`` uses for ``dataset`` (full, or ``quick``)."""
    if dataset == "synthetic":
        if quick:
            # the tiny preset's own geometry (160 µm tiles, 4×) and budget on a small slide: well under a minute on 2
            # CPU cores
            return DemoSettings(
                dataset=dataset,
                description="synthetic Xenium + H&E, 1200 × 1200 µm",
                data={"size_um": 1200.0},
                prepare={"genes": 5, "lr_um": 40.0, "scale": 4, "tile_um": 160.0, "image_key": "he_image"},
                preset="tiny",
                n_samples=1,
            )
        return DemoSettings(
            dataset=dataset,
            description="synthetic Xenium + H&E, 3000 × 3000 µm",
            data={"size_um": 3000.0},
            prepare={"genes": 25, "lr_um": 100.0, "scale": 10, "tile_um": 400.0, "image_key": "he_image"},
            preset="default",
            train_minutes=FULL_TRAIN_MINUTES,
            n_samples=4,
        )
    if dataset == "merfish":
        # 500 × 450 µm: 100 µm tiles give ~23 tiles (15 train / 4 val / 4 test); 25 µm LR keeps 4 × 4 LR pixels per
        # tile (50 µm LR would leave 2 × 2 and only 2 validation tiles)
        prepare = {"genes": 25, "lr_um": 25.0, "scale": 5, "tile_um": 100.0, "image_key": "morphology"}
        description = "Vizgen MERFISH mouse brain (DAPI/PolyT), 500 × 450 µm"
        if quick:
            return DemoSettings(
                dataset=dataset,
                description=description,
                prepare={**prepare, "genes": 5},
                preset="tiny",
                n_samples=1,
            )
        return DemoSettings(
            dataset=dataset,
            description=description,
            prepare=prepare,
            preset="default",
            train_minutes=FULL_TRAIN_MINUTES,
            n_samples=4,
        )
    msg = f"Unknown demo dataset {dataset!r}; choose 'synthetic' (built in) or 'merfish' (real, downloaded once)."
    raise ValueError(msg)


def run_demo(
    *,
    dataset: Dataset = "synthetic",
    out: str | Path = "diffst_demo",
    quick: bool = False,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the whole Diff-ST workflow on built-in data and compare it with bicubic up-sampling.

    Loads the data, writes them to a zarr store, prepares the gene rasters (:func:`diffst.pp.prepare`), trains the
    ``default`` preset (:func:`diffst.tl.train`), super-resolves the whole tissue (:func:`diffst.tl.super_resolve`,
    4 samples for a mean and a standard deviation), up-samples bicubically (:func:`diffst.tl.upsample`), scores both
    on the held-out test tiles (:func:`diffst.tl.evaluate`), draws the maps of 3 genes over a test region and prints a
    summary.

    Parameters
    ----------
    dataset
        ``"synthetic"``: :func:`diffst.datasets.synthetic_xenium` (3000 × 3000 µm with H&E; 25 genes, 100 µm LR →
        10 µm HR, 400 µm tiles). ``"merfish"``: :func:`diffst.datasets.merfish_mouse_brain` (real, 500 × 450 µm with
        DAPI/PolyT; 25 genes, 25 µm LR → 5 µm HR, 100 µm tiles), downloaded into ``dst.settings.cachedir`` once or
        read from ``dst.settings.datadir`` (``$DIFFST_DATA_DIR``).
    out
        Folder for the results (created if needed).
    quick
        A run of about a minute on a 2-core CPU: a 1200 µm synthetic slide (or the MERFISH crop), 5 genes, the
        ``tiny`` preset for a few epochs, one sample. Numbers from it say the pipeline works, not how good Diff-ST is.
    seed
        Seed of the synthetic tissue, the split, training and sampling.
    overwrite
        Replace the results of an earlier demo in ``out``; otherwise such a folder is an error.

    Returns
    -------
    A dict with ``out``, ``zarr``, ``figure``, ``training_figure``, ``metrics_csv``, ``model`` (paths), ``metrics``
    (the table written to ``metrics.csv``: per gene and ``"mean"``, one block per method), ``summary`` (the printed
    text), ``settings`` (:class:`DemoSettings`) and ``seconds``.

    The folder ``out`` then holds ``demo.zarr`` (the data, the prepared elements ``diffst_*``,
    ``images['diffst_sr']``, ``images['diffst_sr_std']`` with several samples, ``images['bicubic_sr']`` and
    ``images['image_floor_sr']``),
    ``gene_maps.png``, ``training.png``, ``metrics.csv`` and ``model/model.pt``.

    """
    t_start = time.perf_counter()
    settings = demo_settings(dataset, quick=quick)
    out = Path(out).expanduser()
    paths = {name: out / rel for name, rel in OUTPUTS.items()}
    _claim(out, paths, overwrite=overwrite)

    import spatialdata as sd

    from . import pl, pp, tl
    from .pl._utils import pyplot

    log.info(f"demo on {settings.description}{' (quick)' if quick else ''} → {out}")
    sdata = _load(settings, seed)
    # write the inputs first and work on the store, as the CLI does: each step writes its elements into it
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*")  # zarr's notice of a future default
        sdata.write(paths["zarr"])
    sdata = sd.read_zarr(paths["zarr"])

    pp.prepare(sdata, **settings.prepare, seed=seed, key_added=KEY)
    budget = {} if settings.train_minutes is None else {"time_budget": 60.0 * settings.train_minutes}
    model = tl.train(
        sdata,
        prepared_key=KEY,
        preset=settings.preset,
        max_epochs=settings.max_epochs,
        seed=seed,
        checkpoint_dir=paths["model_dir"].resolve(),  # recorded in the store: valid from any working directory
        **budget,
    )
    tl.super_resolve(sdata, model=model, prepared_key=KEY, n_samples=settings.n_samples, seed=seed, key_added=SR_KEY)
    tl.upsample(sdata, prepared_key=KEY, method="bicubic", key_added=BICUBIC_KEY)
    tl.upsample(sdata, prepared_key=KEY, method="image", key_added=FLOOR_KEY)

    metrics = _metrics(sdata)
    metrics.to_csv(paths["metrics_csv"])

    genes = list(read_record(sdata, KEY).genes)[:3]
    plt = pyplot()
    fig = pl.gene_maps(sdata, genes=genes, key=SR_KEY, region=_test_region(sdata))
    fig.savefig(paths["figure"], dpi=150)
    plt.close(fig)
    fig = pl.training_history(model)
    fig.savefig(paths["training_figure"], dpi=120)
    plt.close(fig)

    seconds = time.perf_counter() - t_start
    summary = _summary(sdata, settings, model, metrics, paths, genes, seconds, quick=quick)
    print(summary, flush=True)
    return {
        "out": out,
        "zarr": paths["zarr"],
        "figure": paths["figure"],
        "training_figure": paths["training_figure"],
        "metrics_csv": paths["metrics_csv"],
        "model": Path(model.path),
        "metrics": metrics,
        "summary": summary,
        "settings": settings,
        "seconds": seconds,
    }


def _claim(out: Path, paths: dict[str, Path], *, overwrite: bool) -> None:
    """Make ``out`` ready, refusing to replace an earlier demo unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        msg = f"--out {str(out)!r} is a file, not a folder; choose another output folder."
        raise NotADirectoryError(msg)
    earlier = [p for p in paths.values() if p.exists()]
    if earlier and not overwrite:
        names = ", ".join(p.name for p in earlier)
        msg = (
            f"{str(out)!r} already holds a diffst demo ({names}). Pass --overwrite (overwrite=True) to replace it, or "
            "choose another --out."
        )
        raise FileExistsError(msg)
    for p in earlier:  # only what a demo writes: anything else in the folder stays
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _training_summary(info: dict[str, Any]) -> str:
    """Why training stopped, and whether validation had checked it, in a few words."""
    reason = {
        "completed": "all planned steps",
        "early stopping": "stopped early: validation PCC levelled off",
        "time budget": "stopped by the time budget",
    }.get(info.get("stopped_by", ""), str(info.get("stopped_by", "")))
    if not info.get("validated", True):
        return reason + "; never validated, so likely undertrained"
    if info.get("still_improving"):
        return reason + "; validation PCC still improving: more training may help"
    return reason


def _load(settings: DemoSettings, seed: int) -> SpatialData:
    from spatialdata import SpatialData

    from . import datasets

    if settings.dataset == "synthetic":
        full = datasets.synthetic_xenium(**settings.data, seed=seed, boundaries=False)
        # the H&E image and the transcripts are all the workflow needs; the 0.2 µm DAPI image would be most of the store
        return SpatialData(
            images={"he_image": full.images["he_image"]},
            points={"transcripts": full.points["transcripts"]},
            attrs=dict(full.attrs),
        )
    return datasets.merfish_mouse_brain()


def _metrics(sdata: SpatialData) -> pd.DataFrame:
    """Diff-ST, bicubic and image-floor scores on the test tiles, per gene and mean, one block per method."""
    import pandas as pd

    from . import tl

    tables = [tl.evaluate(sdata, key=key, split="test") for key in (SR_KEY, BICUBIC_KEY, FLOOR_KEY)]
    df = pd.concat(tables)
    df.insert(0, "method", df.pop("method"))
    return df


def _test_region(sdata: SpatialData) -> tuple[float, float, float, float]:
    """Bounds in µm of the first test tile and the test tiles touching it (a split block, at most 3 × 3 tiles)."""
    tiles = sdata.shapes[f"{KEY}_tiles"]
    test = tiles[tiles["split"] == "test"]
    if test.empty:  # no test tile (tiny data): any tile
        test = tiles
    first = test.geometry.iloc[0]
    block = test[test.geometry.intersects(first)]
    x0, y0, x1, y1 = block.total_bounds
    return float(x0), float(y0), float(x1), float(y1)


def _summary(
    sdata: SpatialData,
    settings: DemoSettings,
    model: Any,
    metrics: pd.DataFrame,
    paths: dict[str, Path],
    genes: list[str],
    seconds: float,
    *,
    quick: bool,
) -> str:
    record = read_record(sdata, KEY)
    split = record.split.tiles
    means = metrics.loc["mean"].set_index("method")
    names = {"diffst": "Diff-ST", "bicubic": "bicubic", "image_floor": "floor"}
    n_genes = len(record.genes)
    info = model.info
    stopped = _training_summary(info)
    lines = [
        f"diffst demo{' --quick' if quick else ''}: {settings.description}",
        f"  {n_genes} genes, {record.lr_um:g} µm LR → {record.hr_um:g} µm HR ({record.scale}×), "
        f"{record.tile_um:g} µm tiles (train {split['train']} / val {split['val']} / test {split['test']})",
        f"  preset {settings.preset!r}: {info['steps']} of {info.get('planned_steps', info['steps'])} planned steps in "
        f"{info['seconds']:.0f} s ({stopped}); "
        f"{settings.n_samples} sample{'s' if settings.n_samples > 1 else ''} per pixel",
        f"test tiles ({int(means['n_tiles'].iloc[0])}), mean over genes of the per-gene scores "
        "(normalised log1p scale; PCC, SSIM higher and RMSE lower is better):",
        f"  {'method':<9}{'PCC':>8}{'RMSE':>8}{'SSIM':>8}",
    ]
    for method, row in means.iterrows():
        lines.append(f"  {names.get(method, method):<9}{row['pcc']:>8.3f}{row['rmse']:>8.3f}{row['ssim']:>8.3f}")
    if quick:
        lines.append("  (--quick trains for seconds: these numbers test the pipeline, not the method)")
    lines += [
        "wrote:",
        f"  {paths['zarr']}  SpatialData: images['{SR_KEY}'], images['{BICUBIC_KEY}'], "
        f"images['{FLOOR_KEY}'], prepared '{KEY}_*' elements",
        f"  {paths['figure']}  LR | SR mean | truth{' | SR std' if settings.n_samples > 1 else ''} of "
        f"{', '.join(genes)} over a test region",
        f"  {paths['training_figure']}  training curves",
        f"  {paths['metrics_csv']}  per-gene metrics of the three methods",
        f"  {model.path}  the trained model",
        f"done in {_duration(seconds)}. Next: diffst evaluate {paths['zarr']} --key {SR_KEY}",
    ]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"
