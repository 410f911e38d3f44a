"""The user's map, step by step: the one inference pipeline that ``super_resolve`` and the guard both run.

For every output chunk of the HR grid, :meth:`InferencePipeline.block` does, in this order:

1. **windows** — the model windows that reach the chunk (``tile_overlap`` apart, over the tissue), read from the
   prepared rasters and the image;
2. **mean head, averaged over flips** — the base (the fitted floor) plus the network's mean head, averaged over the
   8 rotations/flips of each window (:meth:`~diffst.model.Diffusion.predict_mean`);
3. **samples** — with ``n_samples > 1``, draws of the refiner's diffusion scattered around that mean (each window
   with its own seed), whose variance is the model's spread; a model trained from spots alone gives leave-spots-out
   maps instead (:func:`diffst.model.weak.leave_out`);
4. **blend across windows** — weights that fall to zero at the window borders, for the mean and the variance;
5. **LR projection** — the blended mean rescaled so that, degraded with the data's operator, it reproduces the
   observed LR counts exactly (the std follows the same factor);
6. **guard** — per gene, ``α_g · model + (1 − α_g) · image floor`` with the weights validation chose, and the
   calibrated predictive std ``c_g · sqrt((α_g · std)² + mean)`` (:func:`predictive_std`).

:meth:`InferencePipeline.slide` lays these chunks out as one lazy dask array over the slide (memory does not grow
with the slide; a ``dask.distributed`` cluster can run it) and :func:`compute` runs it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np
import torch
from scipy import ndimage

from .. import _logging as log
from .._contract import Prepared
from .._degradation import BinDegradation, SpotDegradation, degradation_for, project_region, spot_halo
from .._grid import Grid
from .._image import LevelRegion
from .._normalise import to_counts
from .._settings import settings
from .._store import distributed_client, materialise, trim_memory
from ..model import Diffusion
from ._baselines import Upsampler
from ._data import TileSource
from ._features import feature_key
from ._model import Guard
from ._run import format_duration

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ._model import DiffST

#: Output chunk side in LR pixels (each chunk is computed from the windows that reach it).
DEFAULT_BLOCK_LR = 48
#: Samplers ``super_resolve`` accepts (``"fast"``: the model's own fast sampler).
SAMPLERS = ("fast", "ddpm", "ddim", "dpmsolver")


def predictive_std(mean: Any, sample_std: Any) -> Any:
    """Std of a measured count around ``mean`` (expected counts): the sample spread plus Poisson counting noise."""
    return np.sqrt(np.square(sample_std) + np.clip(mean, 0.0, None))


def blend_weights(size: int, overlap: int) -> np.ndarray:
    """1-D window weights: a linear ramp over ``overlap`` pixels at each end (tiny but > 0 at the border)."""
    w = np.ones(size, dtype=np.float32)
    if overlap > 0:
        ramp = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        w[:overlap] = ramp
        w[-overlap:] = ramp[::-1]
    return w


@dataclass
class GuardBlend:
    """Step 6 for the genes written: the floor blend weights ``alpha``, std scales and the floor itself.

    ``floor`` (the image floor of the genes written, computed chunk by chunk) is only held when some weight is
    below 1.
    ``poisson``: the std is the calibrated predictive std; otherwise (a guard fitted before the Poisson term) the
    sample spread scaled, ``α_g · c_g · std``.
    """

    alpha: np.ndarray  # (genes, 1, 1) float32
    std_scale: np.ndarray  # (genes, 1, 1) float32
    poisson: bool
    floor: Upsampler | None

    @classmethod
    def from_guard(
        cls, guard: Guard, sdata: SpatialData, prep: Prepared, model: DiffST, genes: list[str]
    ) -> GuardBlend:
        idx = [model.genes.index(g) for g in genes]
        alpha = np.asarray(guard.alpha, dtype=np.float32)[idx][:, None, None]
        scale = np.asarray(guard.std_scale, dtype=np.float32)[idx][:, None, None]
        floor = None
        if np.any(alpha < 1):
            floor = Upsampler.from_sdata(sdata, prep, "image", genes=genes)
            log.info(
                f"guard: {int(np.sum(alpha[:, 0, 0] < 1))} of {len(genes)} genes blended with the image floor "
                "(weights fitted on validation, see sdata.attrs[key_added]['guard'])"
            )
        return cls(alpha=alpha, std_scale=scale, poisson=guard.std_noise == "poisson", floor=floor)

    @property
    def floor_only(self) -> bool:
        """Every gene is all floor (``α = 0``): the model's maps are not needed."""
        return self.floor is not None and not np.any(self.alpha > 0)

    def apply(self, mean: np.ndarray, std: np.ndarray, hr_rows: tuple[int, int], hr_cols: tuple[int, int]):
        """The guarded mean and std of one chunk (model maps in expected counts, ``(genes, rows, cols)``)."""
        if self.floor is not None:
            floor = self.floor.block(hr_rows, hr_cols)
            mean = mean * self.alpha + floor * (1.0 - self.alpha)
        if self.poisson:
            return mean, self.std_scale * predictive_std(mean, std * self.alpha)
        return mean, std * self.alpha * self.std_scale


@dataclass
class InferencePipeline:
    """A picklable description of the whole super-resolution of one slide by one model.

    Build it with :meth:`from_model`; :meth:`block` computes one chunk of the result, :meth:`slide` the lazy array
    of all of them. See the module docstring for the steps.
    """

    source: TileSource
    net: Any
    diffusion: Diffusion
    grid: Grid
    windows: np.ndarray  # (n, 2) LR origins
    blocks: list[tuple[int, int]]
    block_lr: int
    window_lr: int
    overlap_hr: int
    halo_lr: int
    operator: BinDegradation | SpotDegradation | None
    lr_counts: np.ndarray  # (G_model, h, w) observed LR counts in the model's gene order
    observed: np.ndarray
    gene_scale: np.ndarray
    out_index: np.ndarray
    image_um: float
    sampler: str
    steps: int
    n_samples: int
    average_flips: bool  # whether the mean head is averaged over the 8 rotations/flips (only where there is one)
    consistency: bool
    batch_size: int
    seed: int
    guard: GuardBlend | None = None
    #: Autocast dtype of the network's forward passes (``None``: float32); see :func:`diffst._device.resolve_precision`.
    autocast: torch.dtype | None = None
    #: Maps of windows that reach several chunks, kept until their last chunk has used them (see :class:`_Shared`).
    shared: _Shared = field(default_factory=lambda: _Shared({}))

    @classmethod
    def from_model(cls, sdata: SpatialData, prep: Prepared, model: DiffST, genes: list[str], *, sampler: str = "fast",
                   steps: int | None = None, n_samples: int = 1, average_flips: bool = True, consistency: bool = True,
                   tile_overlap: float = 0.25, batch_size: int = 16, seed: int = 0, block_lr: int = DEFAULT_BLOCK_LR,
                   guard: bool | Guard = True, autocast: torch.dtype | None = None) -> InferencePipeline:  # fmt: skip
        """The pipeline of ``model`` over the prepared slide, writing ``genes``.

        ``guard``: ``True`` applies the model's guard (none without one), a ``Guard`` applies that one,
        ``False`` leaves out step 6 (the raw model maps, which the guard itself is fitted on).
        """
        cfg = model.config
        grid = prep.grid
        window_lr = cfg.lr_px
        stride = max(1, int(round(window_lr * (1 - tile_overlap))))
        overlap_hr = (window_lr - stride) * grid.scale
        h, w = grid.lr_shape
        tissue = prep.tissue(sdata)
        reach = ndimage.binary_dilation(tissue, iterations=1) if tissue.any() else tissue
        rows = _starts(h, window_lr, stride)
        cols = _starts(w, window_lr, stride)
        windows = [
            (r, c) for r in rows for c in cols if reach[max(r, 0) : r + window_lr, max(c, 0) : c + window_lr].any()
        ]
        blocks = [(r, c) for r in range(0, h, block_lr) for c in range(0, w, block_lr)]
        op = degradation_for(sdata, prep) if consistency else None
        halo = spot_halo(op, grid.lr_um)
        lr_all = np.asarray(sdata[prep.elements["lr"]].values, dtype=np.float32)
        model_index = np.array([prep.genes.index(g) for g in model.genes])
        resolved = cfg.sampler if sampler == "fast" else sampler
        if resolved == "ddpm" and sampler == "fast":
            resolved = "dpmsolver"
        n_steps = steps or (cfg.num_train_timesteps if resolved == "ddpm" else cfg.sample_steps)
        source = TileSource.from_sdata(sdata, prep, genes=model.genes, footprint=cfg.supervision == "lr",
                                       features=feature_key(sdata, prep, model), context=model.context_genes)  # fmt: skip
        source.lr = lr_all  # small: keep it in the task instead of re-reading the store
        source.hr = None
        gene_scale = model.gene_scale_for(prep)
        fitted = guard if isinstance(guard, Guard) else (model.guard if guard else None)
        pipe = cls(
            source=source,
            net=model.net.eval(),
            diffusion=model.diffusion_for(gene_scale),
            grid=grid,
            windows=np.array(windows, dtype=np.int64).reshape(-1, 2),
            blocks=blocks,
            block_lr=block_lr,
            window_lr=window_lr,
            overlap_hr=overlap_hr,
            halo_lr=halo,
            operator=op,
            lr_counts=lr_all[model_index],
            observed=prep.coverage > 0,
            gene_scale=gene_scale,
            out_index=np.array([model.genes.index(g) for g in genes]),
            image_um=cfg.image_um,
            sampler=resolved,
            steps=int(n_steps),
            n_samples=int(n_samples),
            average_flips=bool(average_flips and cfg.supervision == "hr" and cfg.objective != "diffusion"),
            consistency=bool(consistency),
            batch_size=int(batch_size),
            seed=int(seed),
            guard=GuardBlend.from_guard(fitted, sdata, prep, model, genes) if fitted else None,
            autocast=autocast,
        )
        pipe.shared = _Shared(pipe.chunks_per_window())
        trim_memory()  # the floor's signal was read in slide-wide strips
        return pipe

    # -------------------------------------------------------------- the slide
    def slide(self) -> da.Array:
        """``(2, genes, H, W)`` lazy array of the whole slide: mean and std, in expected counts."""
        s = self.grid.scale
        hh, ww = self.grid.hr_shape
        b = self.block_lr * s
        chunks = da.core.normalize_chunks((2, len(self.out_index), b, b), shape=(2, len(self.out_index), hh, ww))
        ctx = dask.delayed(self, pure=True, traverse=False)
        return da.map_blocks(
            _run_block, dtype=np.float32, chunks=chunks, ctx=ctx, meta=np.zeros((0, 0, 0, 0), np.float32)
        )

    def chunks_per_window(self) -> dict[tuple[int, int], int]:
        """How many output chunks each window reaches (its maps are needed by each)."""
        s, b = self.grid.scale, self.block_lr
        h, w = self.grid.lr_shape
        counts: dict[tuple[int, int], int] = {}
        for r, c in self.blocks:
            region = self._region((r * s, min(r + b, h) * s), (c * s, min(c + b, w) * s))
            for wr, wc in self._touching(*region):
                counts[(int(wr), int(wc))] = counts.get((int(wr), int(wc)), 0) + 1
        return counts

    def window_runs(self) -> int:
        """Windows to sample over all chunks: each once (a window reaching several chunks is kept for the others)."""
        if self.guard is not None and self.guard.floor_only:
            return 0
        return len(self.chunks_per_window())

    # -------------------------------------------------------------- one chunk
    def block(self, hr_rows: tuple[int, int], hr_cols: tuple[int, int]) -> np.ndarray:
        """Mean and std (expected counts) of the HR pixels ``[rows) × [cols)``: ``(2, genes, rows, cols)``.

        Steps 1–5 (windows, mean head, samples, blend, LR projection), then step 6 (the guard) when the pipeline
        has one.

        Windows are blended with weights that fall off towards their borders: the mean maps and the *variances* over
        samples within each window, so the std does not dip where windows overlap (averaging independent samples of
        neighbouring windows would shrink it there). LR consistency rescales the blended mean; the std follows the
        same per-pixel factor.
        """
        if self.guard is not None and self.guard.floor_only:
            shape = (len(self.out_index), hr_rows[1] - hr_rows[0], hr_cols[1] - hr_cols[0])
            empty = np.zeros(shape, dtype=np.float32)
            return np.stack(self.guard.apply(empty, empty, hr_rows, hr_cols)).astype(np.float32)
        s = self.grid.scale
        r0, c0, r1, c1 = self._region(hr_rows, hr_cols)
        acc, var, wsum = self._blend(r0, c0, r1, c1)
        w = np.maximum(wsum, 1e-12)[None]
        mean = acc / w
        std = np.sqrt(np.maximum(var / w, 0.0))
        if self.consistency and self.operator is not None:
            proj = self._project(mean, r0, c0, r1, c1)
            ratio = np.where(mean > 0, proj / np.where(mean > 0, mean, 1.0), 1.0)
            mean, std = proj, std * ratio
        cut = (self.out_index, slice(hr_rows[0] - r0 * s, hr_rows[1] - r0 * s),
               slice(hr_cols[0] - c0 * s, hr_cols[1] - c0 * s))  # fmt: skip
        mean, std = mean[cut].astype(np.float32), std[cut].astype(np.float32)
        if self.guard is not None:
            mean, std = self.guard.apply(mean, std, hr_rows, hr_cols)
        return np.stack([mean, std]).astype(np.float32)

    def _region(self, hr_rows: tuple[int, int], hr_cols: tuple[int, int]) -> tuple[int, int, int, int]:
        """LR pixels ``r0, c0, r1, c1`` whose windows a chunk of HR pixels needs (with the spot halo)."""
        s = self.grid.scale
        r0, c0 = hr_rows[0] // s - self.halo_lr, hr_cols[0] // s - self.halo_lr
        r1, c1 = -(-hr_rows[1] // s) + self.halo_lr, -(-hr_cols[1] // s) + self.halo_lr
        return r0, c0, r1, c1

    def _touching(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        """Origins of the windows that overlap LR pixels ``[r0, r1) × [c0, c1)``."""
        wr, wc = self.windows[:, 0], self.windows[:, 1]
        hit = (wr < r1) & (wr + self.window_lr > r0) & (wc < c1) & (wc + self.window_lr > c0)
        return self.windows[hit]

    # -------------------------------------------------------------- step 4: blend across windows
    def _blend(self, r0: int, c0: int, r1: int, c1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = self.grid.scale
        n_genes = len(self.gene_scale)
        size = self.window_lr * s
        acc = np.zeros((n_genes, (r1 - r0) * s, (c1 - c0) * s), dtype=np.float64)
        var = np.zeros_like(acc)
        wsum = np.zeros(acc.shape[1:], dtype=np.float64)
        if len(self.windows) == 0:
            return acc, var, wsum
        todo = self._touching(r0, c0, r1, c1)
        w1 = blend_weights(size, self.overlap_hr)
        weight = np.outer(w1, w1)
        per_batch = 1 if self.sampler == "ddpm" else max(1, self.batch_size // self.n_samples)

        def add(wr0: int, wc0: int, m: np.ndarray, v: np.ndarray) -> None:
            # window rows/cols relative to the block, clipped to it
            ar0, ac0 = (wr0 - r0) * s, (wc0 - c0) * s
            sr0, sc0 = max(0, -ar0), max(0, -ac0)
            er, ec = min(size, acc.shape[1] - ar0), min(size, acc.shape[2] - ac0)
            tgt = (slice(ar0 + sr0, ar0 + er), slice(ac0 + sc0, ac0 + ec))
            wpart = weight[sr0:er, sc0:ec]
            acc[(slice(None), *tgt)] += m[:, sr0:er, sc0:ec] * wpart
            var[(slice(None), *tgt)] += v[:, sr0:er, sc0:ec] * wpart
            wsum[tgt] += wpart

        # windows another chunk computed first, then this chunk's own, each added as soon as it is there (only the
        # windows later chunks need are kept: memory does not grow with the windows of a chunk)
        fresh = []
        for key in map(tuple, todo.tolist()):
            maps = self.shared.take(key)
            if maps is None:
                fresh.append(key)
            else:
                add(*key, *maps)
        fresh = np.array(fresh, dtype=np.int64).reshape(-1, 2)
        # the image under this chunk's windows, read once: memory does not grow with the slide
        region = self.source.preload(fresh, self.window_lr, self.image_um) if len(fresh) else None
        for i in range(0, len(fresh), per_batch):
            group = fresh[i : i + per_batch]
            means, variances = self.window_maps(group, region)  # (len(group), G, size, size) counts each
            for (wr0, wc0), m, v in zip(group, means, variances, strict=True):
                self.shared.keep((int(wr0), int(wc0)), (m, v))
                add(int(wr0), int(wc0), m, v)
            if _progress is not None:  # a local run's bar (workers of a cluster have none)
                _progress.update(len(group))
        return acc, var, wsum

    # -------------------------------------------------------------- steps 1-3: one batch of windows
    def window_maps(self, group: np.ndarray, region: LevelRegion | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean map and variance over samples, in expected counts, of each window: two ``(n, G, size, size)``.

        ``region``: the part of the image level that holds the windows' crops (:meth:`TileSource.preload`).
        """
        items = [
            self.source.read(int(r), int(c), self.window_lr, self.image_um, self.gene_scale, with_hr=False,
                             image=region)
            for r, c in group
        ]  # fmt: skip
        k = self.n_samples
        device = next(self.net.parameters()).device
        lr = torch.from_numpy(np.stack([it["lr"] for it in items])).to(device)
        mask = torch.from_numpy(np.stack([it["mask"] for it in items])).to(device)
        image = torch.from_numpy(np.stack([it["image"] for it in items])).to(device)
        context = None
        if self.diffusion.config.context_genes:
            context = torch.from_numpy(np.stack([it["context"] for it in items])).to(device)
        size = self.window_lr * self.grid.scale
        n, g = len(group), len(self.gene_scale)
        if self.diffusion.config.supervision == "lr":
            return self._leave_out_windows(group, items, lr, mask, image, context)
        with torch.inference_mode(), self._autocast(device):
            head = self.diffusion.predict_mean(self.net, lr, mask, image, average_flips=self.average_flips,
                                               max_batch=self.batch_size, context=context)  # fmt: skip
        mean = None if head is None else to_counts(head.float().cpu().numpy(), self.gene_scale)
        if mean is not None and (k == 1 or self.diffusion.config.objective == "regression"):
            return mean, np.zeros_like(mean)
        noise = []
        for r, c in group:
            gen = torch.Generator().manual_seed(window_seed(self.seed, int(r), int(c)))
            noise.append(torch.randn((k, g, size, size), generator=gen))
        noise = torch.cat(noise).to(device)
        gen = torch.Generator().manual_seed(window_seed(self.seed, int(group[0][0]), int(group[0][1])) + 1)
        rep = {"lr": lr, "mask": mask, "image": image, **({} if context is None else {"context": context})}
        rep = {name: v.repeat_interleave(k, 0) for name, v in rep.items()}
        with torch.inference_mode(), self._autocast(device):
            x = self.diffusion.sample(
                self.net, rep["lr"], rep["mask"], rep["image"], sampler=self.sampler, steps=self.steps, noise=noise,
                generator=gen, mean=None if head is None else head.repeat_interleave(k, 0), context=rep.get("context"),
            )  # fmt: skip
        samples = to_counts(x.float().cpu().numpy(), self.gene_scale).reshape(n, k, g, size, size)
        # the refiner's map is its mean head (samples scatter around it); the paper's is the average of samples
        return (samples.mean(axis=1) if mean is None else mean), samples.var(axis=1)

    def _autocast(self, device: torch.device) -> Any:
        """The forward passes in :attr:`autocast`'s dtype (their outputs are turned back to float32)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    def _leave_out_windows(
        self, group: np.ndarray, items: list[dict], lr, mask, image, context=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """A model trained from the spots alone: ``n_samples`` leave-spots-out maps per window, their mean and variance.

        Each map splits the window's LR pixels into two random groups (seeded by the window's position, so that it
        does not depend on the batch) and predicts every HR pixel with its own spot hidden, as training did
        (:func:`diffst.model.weak.leave_out`).
        """
        from ..model import weak

        device = lr.device
        foot = torch.from_numpy(np.stack([it["foot"] for it in items])).to(device)
        offset = torch.from_numpy(np.stack([it["offset"] for it in items])).to(device)
        gens = [torch.Generator().manual_seed(window_seed(self.seed, int(r), int(c))) for r, c in group]
        maps = []
        for _ in range(self.n_samples):
            split = torch.stack([torch.rand(mask.shape[1:], generator=gen) < 0.5 for gen in gens]).to(device)
            with torch.inference_mode():
                predict = weak.predictors(self.diffusion, self.net, image, context=context)[""]
                hr = weak.leave_out(predict, lr, mask, foot, offset, self.grid.scale, split)
            maps.append(to_counts(hr.float().cpu().numpy(), self.gene_scale))
        samples = np.stack(maps, axis=1)
        return samples.mean(axis=1), samples.var(axis=1)

    # -------------------------------------------------------------- step 5: LR projection
    def _project(self, x: np.ndarray, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        """LR-consistency on the region ``[r0, r1) × [c0, c1)`` of LR pixels (zero-padded outside the grid)."""
        return project_region(self.operator, x, self.lr_counts, self.observed, (r0, c0, r1, c1))


class _Shared:
    """Maps of the windows that reach several output chunks, computed by the first chunk and kept for the others.

    Each entry is dropped once the last chunk that needs it has taken it, so at most the windows along the chunk
    borders still to be done are held. Every window has its own seed, so a window computed again (another worker of
    a cluster, or a chunk run twice) gives the same maps: the cache saves work, never changes a result.
    """

    def __init__(self, uses: dict[tuple[int, int], int]) -> None:
        self.uses = {k: n for k, n in uses.items() if n > 1}
        self.maps: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.left: dict[tuple[int, int], int] = {}
        self.lock = threading.Lock()

    def take(self, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
        with self.lock:
            maps = self.maps.get(key)
            if maps is not None:
                self.left[key] -= 1
                if self.left[key] <= 0:
                    del self.maps[key], self.left[key]
            return maps

    def keep(self, key: tuple[int, int], maps: tuple[np.ndarray, np.ndarray]) -> None:
        with self.lock:
            if self.uses.get(key, 1) > 1:
                self.maps[key] = maps
                self.left[key] = self.uses[key] - 1

    def __getstate__(self) -> dict[str, Any]:
        # sent to workers empty: each keeps what it computes itself
        return {"uses": self.uses}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uses"])


#: The progress bar of the super-resolution running in this process, if any (see :func:`compute`).
_progress: Any = None


def _run_block(block_info: dict | None = None, ctx: InferencePipeline | None = None) -> np.ndarray:
    loc = block_info[None]["array-location"]
    # tasks may read lazily-loaded image chunks: do it in this thread, never through a nested scheduler
    with dask.config.set(scheduler="synchronous"):
        out = ctx.block(loc[2], loc[3])
    trim_memory()
    return out


def window_seed(seed: int, row: int, col: int) -> int:
    """The seed of the window whose top-left LR pixel is ``(row, col)``: its samples do not depend on the batch."""
    return int(np.random.SeedSequence([seed, row + 2**20, col + 2**20]).generate_state(1)[0])


def _starts(n: int, size: int, stride: int) -> list[int]:
    """Window origins covering ``[0, n)``: every ``stride``, the last one ending at or after ``n``."""
    starts = list(range(0, max(n - size, 0) + 1, stride))
    if starts[-1] + size < n:
        starts.append(starts[-1] + stride)
    return starts


class _LogProgress:
    """The bar's ``update`` as plain log lines every ``dst.settings.progress_every`` seconds (output to a file)."""

    def __init__(self, total: int) -> None:
        self.total, self.n = int(total), 0
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.n += int(n)
        now = time.perf_counter()
        if now - self.last >= settings.progress_every or self.n >= self.total:
            self.last = now
            spent = now - self.t0
            left = spent / self.n * (self.total - self.n) if self.n else 0.0
            log.info(
                f"super-resolving: {self.n}/{self.total} windows · {format_duration(spent)} · "
                f"about {format_duration(left)} left"
            )


@contextlib.contextmanager
def _progress_bar(total: int, show: bool):
    """Install a progress display over ``total`` window samplings as this process's :data:`_progress`.

    A tqdm bar in a terminal or a notebook, plain log lines otherwise.
    """
    global _progress
    if not show:
        yield
        return
    if log.interactive():
        from tqdm.auto import tqdm

        bar: Any = tqdm(total=total, desc="super-resolving", unit="window")
    else:
        bar = contextlib.nullcontext(_LogProgress(total))
    with bar as progress:
        _progress = progress
        try:
            yield
        finally:
            _progress = None


def compute(stack: da.Array, scratch: Path | None, windows: int) -> Any:
    """Run the graph with :func:`diffst._store.materialise` and a progress bar over ``windows`` window samplings.

    On a cluster, its dashboard shows the progress instead.
    """
    show = not distributed_client() and settings.verbosity >= 1
    with _progress_bar(windows, show):
        return materialise(stack, scratch)
