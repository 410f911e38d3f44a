"""Read what ``dst.pp.prepare`` wrote and stream tiles (image crop, LR, mask, HR) to the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .._contract import Prepared, read_window
from .._grid import Grid
from .._image import ImageSpec, LevelRegion, in_memory_level, preload, read_tile
from .._normalise import lr_to_model_units, to_model_units

if TYPE_CHECKING:
    import geopandas as gpd
    from spatialdata import SpatialData


@dataclass
class TileSource:
    """Everything needed to cut model inputs out of a prepared slide, without holding the SpatialData.

    ``lr`` and ``hr`` may be dask arrays (read lazily) or numpy arrays; ``gene_index`` picks and orders the channels
    (the model's gene order). Picklable, so tasks on a dask cluster can carry it.
    """

    grid: Grid
    image_element: Any
    image: ImageSpec
    lr: Any
    coverage: np.ndarray
    hr: Any | None = None
    gene_index: np.ndarray | None = None
    #: The degradation operator's footprint (``weight`` ``(H, W)``, ``offset`` ``(2, H, W)``, see
    #: :meth:`diffst._degradation.SpotDegradation.footprint`), for training and predicting through it.
    footprint: tuple[np.ndarray, np.ndarray] | None = None
    #: Image features on the HR grid ``(F, H, W)`` (:func:`diffst.pp.image_features`), appended to each image crop.
    features: Any | None = None
    #: LR counts of the panel-context genes ``(K, h, w)`` and their per-gene scale (``prepare(context_genes=...)``).
    context: Any | None = None
    context_scale: np.ndarray | None = None

    @classmethod
    def from_sdata(
        cls,
        sdata: SpatialData,
        prep: Prepared,
        genes: list[str] | None = None,
        *,
        footprint: bool = False,
        features: str | None = None,
        context: list[str] | None = None,
    ) -> TileSource:
        """Source of the prepared elements, channels in the order of ``genes`` (default: the prepared order).

        ``footprint`` adds the degradation's footprint, so that windows carry ``foot``, ``offset`` and ``area``;
        ``features`` names an image-feature element on the HR grid whose maps follow the image channels;
        ``context`` the panel-context genes windows carry (``context``, model units), in that order (default: the
        prepared ones).
        """
        index = None if genes is None else np.array([prep.genes.index(g) for g in genes])
        foot = None
        if footprint:
            from .._degradation import degradation_for

            foot = degradation_for(sdata, prep).footprint(prep.grid.hr_shape)
        ctx, ctx_scale = None, None
        names = prep.context_genes if context is None else list(context)
        if names:
            missing = [g for g in names if g not in prep.context_genes]
            if missing:
                msg = (
                    f"The prepared data under {prep.key!r} lack the panel-context genes {missing[:10]} the model reads; "
                    f"prepare them with `context_genes={names!r}`."
                )
                raise ValueError(msg)
            order = np.array([prep.context_genes.index(g) for g in names])
            ctx = np.asarray(sdata[prep.elements["context"]].values, dtype=np.float32)[order]
            ctx_scale = prep.context_scale[order]
        return cls(
            grid=prep.grid,
            image_element=sdata.images[prep.image.key],
            image=prep.image,
            lr=sdata[prep.elements["lr"]].data,
            coverage=prep.coverage,
            hr=sdata[prep.elements["hr"]].data if prep.has_hr else None,
            gene_index=index,
            footprint=foot,
            features=_feature_array(sdata, features) if features is not None else None,
            context=ctx,
            context_scale=ctx_scale,
        )

    def cache_image(self, image_um: float, max_bytes: int = 512 * 2**20) -> TileSource:
        """Hold in memory the pyramid level that crops at ``image_um`` are read from, when it is small enough.

        Every window re-reads the image; for lazily computed or remote images that repeats work. The level kept is
        the one :func:`diffst._image.read_tile` would pick, so the crops are identical.
        """
        self.image_element = in_memory_level(self.image_element, self.image, image_um, max_bytes)
        return self

    def bbox_um(self, lr_row0: int, lr_col0: int, size_lr: tuple[int, int]) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` in µm of the window whose top-left LR pixel is ``(lr_row0, lr_col0)``."""
        g = self.grid
        x0, y0 = g.origin_um[0] + lr_col0 * g.lr_um, g.origin_um[1] + lr_row0 * g.lr_um
        return x0, y0, x0 + size_lr[1] * g.lr_um, y0 + size_lr[0] * g.lr_um

    def preload(self, origins: np.ndarray, size_lr: int, image_um: float) -> LevelRegion:
        """The part of the image level crops at ``image_um`` come from that holds the windows at ``origins``.

        Memory is that of the windows' region, whatever the slide's size; their crops are those of the whole level.
        """
        boxes = np.array([self.bbox_um(int(r), int(c), (size_lr, size_lr)) for r, c in origins])
        union = (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max())
        return preload(self.image_element, self.image, union, image_um)

    def read(
        self,
        lr_row0: int,
        lr_col0: int,
        size_lr: int | tuple[int, int],
        image_um: float,
        gene_scale: np.ndarray,
        *,
        with_hr: bool = True,
        image: LevelRegion | None = None,
    ) -> dict[str, np.ndarray]:
        """One model input window whose top-left LR pixel is ``(lr_row0, lr_col0)``, ``size_lr`` LR pixels wide.

        ``size_lr`` may be ``(rows, cols)`` for a rectangular region. Returns model-unit arrays ``lr`` ``(G, h, w)``,
        ``mask`` ``(1, h, w)``, ``image`` ``(C, Hi, Wi)`` and, when available and asked for, ``x0`` ``(G, H, W)``;
        with a :attr:`footprint`, also ``foot`` ``(1, H, W)`` and ``offset`` ``(2, H, W)`` (its two parts) and
        ``area`` ``(1, h, w)``, each LR pixel's whole footprint in HR pixels (``coverage · scale²``).
        Windows reaching past the grid are padded as unobserved. ``image``: the part of the image level that holds
        the window's crop (:meth:`preload`), else it is read from :attr:`image_element`.
        """
        g = self.grid
        s = g.scale
        size_r, size_c = (size_lr, size_lr) if np.isscalar(size_lr) else (int(size_lr[0]), int(size_lr[1]))
        rows, cols = (lr_row0, lr_row0 + size_r), (lr_col0, lr_col0 + size_c)
        hr_rows, hr_cols = (rows[0] * s, rows[1] * s), (cols[0] * s, cols[1] * s)
        lr = read_window(self.lr, rows, cols, channels=self.gene_index)
        cov = read_window(self.coverage, rows, cols)
        out = {"lr": lr_to_model_units(lr, cov, s, gene_scale), "mask": np.clip(cov, 0.0, 1.0)[None]}
        if self.context is not None:
            out["context"] = lr_to_model_units(read_window(self.context, rows, cols), cov, s, self.context_scale)
        bbox = self.bbox_um(lr_row0, lr_col0, (size_r, size_c))
        out["image"] = read_tile(self.image_element if image is None else image, self.image, bbox, image_um)
        if self.features is not None:
            feats = read_window(self.features, hr_rows, hr_cols)
            per_hr = int(round(g.hr_um / image_um))
            feats = np.repeat(np.repeat(feats, per_hr, axis=1), per_hr, axis=2)
            out["image"] = np.concatenate([out["image"], feats])
        if with_hr and self.hr is not None:
            out["x0"] = to_model_units(read_window(self.hr, hr_rows, hr_cols, channels=self.gene_index), gene_scale)
        if self.footprint is not None:
            out["area"] = cov[None] * s * s
            for name, full in zip(("foot", "offset"), self.footprint, strict=True):
                out[name] = read_window(full[None] if full.ndim == 2 else full, hr_rows, hr_cols)
        return out


def _feature_array(sdata: SpatialData, name: str, max_bytes: int = 512 * 2**20) -> Any:
    """The finest level of a feature element, in memory when small enough (windows slice it many times)."""
    from .._spatial import image_levels

    data = image_levels(sdata.images[name])[0].data
    return np.asarray(data) if data.nbytes <= max_bytes else data


class TileDataset(Dataset):
    """The prepared tiles of one split as model inputs (read lazily, cached once read).

    Parameters
    ----------
    sdata
        The prepared SpatialData.
    prep
        What :meth:`Prepared.from_sdata` found.
    split
        ``"train"``, ``"val"`` or ``"test"``.
    image_um
        µm per pixel of the image crops the model takes.
    gene_scale
        Per-gene scale of the model units.
    cache
        Keep tiles in memory after their first read (they are small; the slide never is loaded whole).

    """

    def __init__(
        self,
        sdata: SpatialData,
        prep: Prepared,
        split: str,
        *,
        image_um: float,
        gene_scale: np.ndarray,
        cache: bool = True,
    ) -> None:
        self.source = TileSource.from_sdata(sdata, prep).cache_image(image_um)
        self.tile_lr = prep.tile_lr
        tiles = prep.tiles(sdata, split)
        self.origins = list(zip(tiles["lr_row0"].astype(int), tiles["lr_col0"].astype(int), strict=True))
        self.image_um = image_um
        self.gene_scale = np.asarray(gene_scale, dtype=np.float32)
        self._cache: dict[int, dict[str, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.origins)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        r0, c0 = self.origins[i]
        arrays = self.source.read(r0, c0, self.tile_lr, self.image_um, self.gene_scale)
        item = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        if self._cache is not None:
            self._cache[i] = item
        return item


#: Largest image region (bytes, float32) a :class:`WindowDataset` holds in memory.
MAX_REGION_BYTES = 1 << 30
#: Distinct training-window positions wanted before the window shrinks below the largest size allowed.
MIN_POSITIONS = 16


def split_region(prep: Prepared, sdata: SpatialData, split: str) -> np.ndarray:
    """LR pixels ``(h, w)`` covered by the tiles of one split."""
    region = np.zeros(prep.grid.lr_shape, dtype=bool)
    t = prep.tile_lr
    tiles = prep.tiles(sdata, split)
    for r0, c0 in zip(tiles["lr_row0"].astype(int), tiles["lr_col0"].astype(int), strict=True):
        region[r0 : r0 + t, c0 : c0 + t] = True
    return region


def window_origins(region: np.ndarray, size: int) -> np.ndarray:
    """Top-left LR pixels ``(n, 2)`` of every ``size × size`` window lying wholly inside ``region``."""
    h, w = region.shape
    if size > h or size > w:
        return np.zeros((0, 2), dtype=np.int64)
    c = np.pad(np.cumsum(np.cumsum(region.astype(np.int64), 0), 1), ((1, 0), (1, 0)))
    inside = c[size:, size:] - c[:-size, size:] - c[size:, :-size] + c[:-size, :-size]
    return np.argwhere(inside == size * size).astype(np.int64)


def choose_window(region: np.ndarray | list[np.ndarray], max_size: int, min_positions: int = MIN_POSITIONS) -> int:
    """The largest window side (LR pixels, at most ``max_size``) with ``min_positions`` positions in ``region``.

    A small training region gets smaller windows, so that training sees many distinct windows rather than one tile
    over and over; when even one-pixel windows have fewer positions, the side with the most positions wins.
    ``region`` may be several (one per section): their positions add up.
    """
    regions = region if isinstance(region, list) else [region]
    counts = {size: sum(len(window_origins(r, size)) for r in regions) for size in range(max(1, max_size), 0, -1)}
    for want in (min_positions, 4):
        for size, n in counts.items():
            if n >= want:
                return size
    return 1


#: Share of a training region held out for validation when the prepared data have no validation tile.
HOLDOUT_SHARE = 0.2


def holdout(
    region: np.ndarray, share: float = HOLDOUT_SHARE, tissue: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split a training region ``(h, w)`` of LR pixels into a training part and a spatially blocked validation band.

    The band is the last rows (or columns, along the region's longer side) that hold about ``share`` of its tissue
    pixels, at least one line of them; the rest trains. Neighbouring pixels share structure, so a band (not scattered
    pixels) is what tells how the model does on tissue it has not seen. With ``tissue`` (the prepared LR tissue
    mask), lines are counted over the region's tissue pixels only, so the band never falls in the empty margin of a
    tile that reaches past the tissue; the band still takes the whole lines of the region (margin included) from its
    first tissue line to the far end, so validation windows fit in it.
    """
    inside = region if tissue is None or not (region & tissue).any() else region & tissue
    rows, cols = np.nonzero(inside)
    if len(rows) < 2:
        return region.copy(), np.zeros_like(region)
    axis = 0 if rows.max() - rows.min() >= cols.max() - cols.min() else 1
    lines = np.sort(np.unique(rows if axis == 0 else cols))[::-1]  # from the far end
    per_line = np.array([int(inside[line].sum() if axis == 0 else inside[:, line].sum()) for line in lines])
    # the number of lines whose pixels come nearest the share (at least one; at least one line left to train on)
    n = int(np.argmin(np.abs(np.cumsum(per_line) - share * len(rows)))) + 1
    n = min(max(1, n), len(lines) - 1)
    val = np.zeros_like(region)
    if axis == 0:
        val[lines[n - 1] :] = region[lines[n - 1] :]
    else:
        val[:, lines[n - 1] :] = region[:, lines[n - 1] :]
    return region & ~val, val


def covering_origins(region: np.ndarray, size: int) -> np.ndarray:
    """Non-overlapping windows of ``size`` LR pixels inside ``region``, row by row: fixed validation windows."""
    inside = {tuple(o) for o in window_origins(region, size).tolist()}
    taken = np.zeros_like(region)
    out = []
    for r, c in sorted(inside):
        if not taken[r : r + size, c : c + size].any():
            taken[r : r + size, c : c + size] = True
            out.append((r, c))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def tiled_origins(tiles: gpd.GeoDataFrame, tile_lr: int, size: int) -> np.ndarray:
    """Fixed windows of ``size`` LR pixels covering each tile (the last one flush with the tile's far edge)."""
    starts = sorted({*range(0, max(tile_lr - size, 0) + 1, size), max(tile_lr - size, 0)})
    out = [
        (r0 + dr, c0 + dc)
        for r0, c0 in zip(tiles["lr_row0"].astype(int), tiles["lr_col0"].astype(int), strict=True)
        for dr in starts
        for dc in starts
    ]
    return np.array(out, dtype=np.int64).reshape(-1, 2)


class WindowSampler(torch.utils.data.Sampler[int]):
    """``num_samples`` window indices per epoch, drawn uniformly with replacement; a function of ``(seed, epoch)``.

    Its own class (not :class:`torch.utils.data.RandomSampler`) so that Lightning, under DDP, wraps it (each process
    gets a share of ``num_samples``) instead of replacing it with a sampler over the whole dataset. The draw of an
    epoch depends only on the seed and the epoch (Lightning calls :meth:`set_epoch`; without it each iteration is
    the next epoch), and :meth:`skip` drops the batches an interrupted epoch already trained on, so a resumed run
    sees exactly the windows an uninterrupted one would.
    """

    def __init__(self, n: int, num_samples: int, seed: int) -> None:
        self.n, self.num_samples, self.seed = int(n), int(num_samples), int(seed)
        self.epoch = 0
        self._skip: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip(self, epoch: int, n: int) -> None:
        """Leave out the first ``n`` indices of epoch ``epoch`` (the part an interrupted run already did)."""
        self._skip = (int(epoch), int(n))

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        idx = torch.randint(self.n, (self.num_samples,), generator=g).tolist()
        start = 0
        if self._skip is not None and self._skip[0] == epoch:
            start, self._skip = self._skip[1], None
        return iter(idx[start:])


class WindowDataset(Dataset):
    """Model input windows of ``size`` LR pixels at given origins, cut from one read of their bounding box.

    The image, LR, mask and HR of the region spanned by ``origins`` are read once (model units) and every window is
    a slice of them, so random windows cost no image resampling. Training draws origins at random through its
    sampler; validation and test use fixed ones.
    """

    def __init__(
        self,
        source: TileSource,
        origins: np.ndarray,
        size: int,
        *,
        image_um: float,
        gene_scale: np.ndarray,
    ) -> None:
        self.origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
        self.size = int(size)
        self.scale = source.grid.scale
        self.per_lr = int(round(source.grid.lr_um / image_um))
        self.source, self.image_um, self.gene_scale = source, image_um, np.asarray(gene_scale, dtype=np.float32)
        self.region: dict[str, torch.Tensor] | None = None
        if len(self.origins) == 0:
            return
        self.r0, self.c0 = (int(v) for v in self.origins.min(axis=0))
        r1, c1 = (int(v) + self.size for v in self.origins.max(axis=0))
        n_px = (r1 - self.r0) * (c1 - self.c0) * self.per_lr**2
        if n_px * len(source.image.channels) * 4 > MAX_REGION_BYTES:
            return  # too large to hold: read each window on its own
        arrays = source.read(self.r0, self.c0, (r1 - self.r0, c1 - self.c0), image_um, gene_scale)
        self.region = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}

    def __len__(self) -> int:
        return len(self.origins)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """One window: its maps (model units) and ``gene_scale`` ``(G,)``, the scales they were normalised with."""
        scale = torch.from_numpy(self.gene_scale)
        if self.region is None:
            r, c = (int(v) for v in self.origins[i])
            arrays = self.source.read(r, c, self.size, self.image_um, self.gene_scale)
            return {**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, "gene_scale": scale}
        r, c = int(self.origins[i, 0]) - self.r0, int(self.origins[i, 1]) - self.c0
        n, s, k = self.size, self.scale, self.per_lr
        out = {"gene_scale": scale}
        for name, v in self.region.items():
            f = {"lr": 1, "mask": 1, "area": 1, "context": 1, "x0": s, "foot": s, "offset": s, "image": k}[name]
            out[name] = v[:, r * f : (r + n) * f, c * f : (c + n) * f].clone()
        return out
