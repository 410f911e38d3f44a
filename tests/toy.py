"""Tiny hand-made SpatialData objects with known geometry, for alignment and error tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, PointsModel, ShapesModel, TableModel
from spatialdata.transformations import Affine, Identity, Scale

GENES = [f"G{i}" for i in range(8)]


def toy_xenium(
    *,
    size_um: float = 800.0,
    pixel_size: float = 0.5,
    n: int = 40_000,
    seed: int = 0,
    extra: pd.DataFrame | None = None,
    he: bool = False,
) -> SpatialData:
    """Transcripts in µm with ``Scale(1/pixel_size)`` to ``global`` and a DAPI image of ``global`` pixels.

    Transcripts cluster around "nuclei" that are bright in the image, so image and counts agree.
    """
    rng = np.random.default_rng(seed)
    n_cells = int(size_um**2 / 400)
    cx = rng.uniform(20, size_um - 20, n_cells)
    cy = rng.uniform(20, size_um - 20, n_cells)
    cell = rng.integers(0, n_cells, n)
    x = cx[cell] + rng.normal(0, 3, n)
    y = cy[cell] + rng.normal(0, 3, n)
    gene = np.array(GENES)[(cell % len(GENES) + rng.integers(0, 2, n)) % len(GENES)]
    df = pd.DataFrame({"x": x, "y": y, "feature_name": gene})
    if extra is not None:
        df = pd.concat([df, extra], ignore_index=True)
    df["feature_name"] = df["feature_name"].astype("category")
    points = PointsModel.parse(
        df,
        coordinates={"x": "x", "y": "y"},
        feature_key="feature_name",
        transformations={"global": Scale([1 / pixel_size, 1 / pixel_size], axes=("x", "y"))},
    )
    npx = int(size_um / pixel_size)
    img = np.zeros((1, npx, npx), dtype=np.uint16)
    r = np.clip((cy / pixel_size).astype(int), 0, npx - 1)
    c = np.clip((cx / pixel_size).astype(int), 0, npx - 1)
    img[0, r, c] = 4000
    images = {
        "morphology_focus": Image2DModel.parse(
            img, dims=("c", "y", "x"), c_coords=["DAPI"], transformations={"global": Identity()}
        )
    }
    if he:
        he_px = 2 * pixel_size
        rgb = np.full((3, npx // 2, npx // 2), 240, dtype=np.uint8)
        rgb[:, r // 2, c // 2] = 60
        m = np.array([[he_px / pixel_size, 0, 0], [0, he_px / pixel_size, 0], [0, 0, 1]])
        images["he_image"] = Image2DModel.parse(
            rgb,
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            transformations={"global": Affine(m, input_axes=("x", "y"), output_axes=("x", "y"))},
        )
    return SpatialData(images=images, points={"transcripts": points})


def toy_visium(*, n_side: int = 12, um_per_px: float = 0.5, seed: int = 0, dataset_id: str = "toy") -> SpatialData:
    """Visium-like spots (55 µm, 100 µm hexagonal lattice) in full-resolution pixels, with an RGB image.

    As Space Ranger and ``spatialdata_io.visium`` write them: ``array_col`` steps by 2 along a row and odd rows are
    offset by one column; the circles' radius is half ``spot_diameter_fullres``, the pixel width of a 65 µm spot.
    """
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    x_um = 100.0 + cols.ravel() * 100.0 + (rows.ravel() % 2) * 50.0
    y_um = 100.0 + rows.ravel() * 100.0 * np.sqrt(3) / 2
    n = len(x_um)
    counts = rng.poisson(
        5 + 20 * (x_um[:, None] / x_um.max()) * (np.arange(len(GENES))[None] % 2), size=(n, len(GENES))
    )
    import anndata as ad
    import scipy.sparse as sp

    adata = ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), var=pd.DataFrame(index=GENES))
    adata.obs["spot_id"] = np.arange(n)
    adata.obs["region"] = pd.Categorical([dataset_id] * n)
    adata.obs["array_row"] = rows.ravel()
    adata.obs["array_col"] = 2 * cols.ravel() + rows.ravel() % 2
    adata.obs_names = [f"S{i}" for i in range(n)]
    coords = np.column_stack([x_um, y_um]) / um_per_px
    adata.obsm["spatial"] = coords
    shapes = ShapesModel.parse(
        coords,
        geometry=0,
        radius=np.full(n, 65.0 / 2 / um_per_px),
        index=adata.obs["spot_id"].copy(),
        transformations={dataset_id: Identity()},
    )
    table = TableModel.parse(adata, region=dataset_id, region_key="region", instance_key="spot_id")
    size = int((x_um.max() + 150) / um_per_px)
    img = np.full((3, size, size), 230, dtype=np.uint8)
    img[:, 20:-20, 20:-20] = 180
    image = Image2DModel.parse(
        img, dims=("c", "y", "x"), c_coords=["r", "g", "b"], transformations={dataset_id: Identity()}
    )
    return SpatialData(images={f"{dataset_id}_full_image": image}, shapes={dataset_id: shapes}, tables={"table": table})


#: Arguments of ``dst.tl.train`` for tests: the tiny preset, a quick validation sampler, no progress bar.
FAST = {"preset": "tiny", "val_steps": 2, "enable_progress_bar": False}


def toy_prepared(seed: int = 0, size_um: float = 800.0, *, he: bool = False, **prepare_kw) -> SpatialData:
    """The toy section most tests train on: 5 genes, 40 → 10 µm, 160 µm tiles (``prepare_kw`` overrides)."""
    import diffst as dst

    sdata = toy_xenium(size_um=size_um, n=int(60_000 * (size_um / 800.0) ** 2), seed=seed, he=he)
    kwargs = {"genes": 5, "lr_um": 40, "scale": 4, "tile_um": 160, **prepare_kw}
    dst.pp.prepare(sdata, image_key="he_image" if he else None, **kwargs)
    return sdata
