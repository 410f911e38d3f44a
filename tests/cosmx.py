"""A writer of small but complete NanoString CosMx output folders, as ``spatialdata_io.cosmx`` reads them.

The files ``spatialdata_io`` 0.7's reader opens: ``<id>_exprMat_file.csv`` (cells × targets), ``<id>_metadata_file.csv``
(cell centres in FOV-local and global pixels), ``<id>_fov_positions_file.csv``, ``<id>_tx_file.csv`` (transcripts in
FOV-local and global pixels), ``CellComposite/CellComposite_F<fov>.jpg`` (the RGB immunofluorescence composite of each
FOV) and ``CellLabels/CellLabels_F<fov>.tif`` (cell labels). Everything is in pixels: the instrument's pixel size
(0.18 µm on FOVs of 5472 × 3648 pixels, 0.12028 µm on FOVs of 4256 × 4256) is written nowhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from PIL import Image

#: FOV images of the two CosMx generations: (rows, cols) and µm per pixel.
FOV_SHAPES = {"2021": ((3648, 5472), 0.18), "2023": ((4256, 4256), 0.12028)}


def write_cosmx(path: Path, *, generation: str = "2021", fovs: tuple[int, ...] = (1,), n_cells: int = 120,
                n_targets: int = 12, seed: int = 0, dataset_id: str = "Run1",
                image_shape: tuple[int, int] | None = None) -> dict:  # fmt: skip
    """Write a CosMx folder; returns what a reader should recover (µm per pixel, the FOV offsets, the targets).

    ``image_shape``: write FOV images of another size than the instrument's (a cropped export).

    Cells sit in the middle of each FOV (a 600 × 600 pixel patch, bright in the image), each with transcripts of
    a few targets around it; the FOV's global offset is ``(fov · 10000, 2000)`` pixels.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    (rows, cols), um = FOV_SHAPES[generation]
    if image_shape is not None:
        rows, cols = image_shape
    targets = [f"T{i}" for i in range(n_targets)] + ["NegPrb1"]
    (path / "CellComposite").mkdir(parents=True, exist_ok=True)
    (path / "CellLabels").mkdir(parents=True, exist_ok=True)
    meta, counts, tx, positions = [], [], [], []
    for fov in fovs:
        x_off, y_off = fov * 10_000.0, 2_000.0
        positions.append({"fov": fov, "x_global_px": x_off, "y_global_px": y_off})
        image = np.full((rows, cols, 3), 10, dtype=np.uint8)
        labels = np.zeros((rows, cols), dtype=np.uint16)
        cx = rng.uniform(cols / 2 - 300, cols / 2 + 300, n_cells)
        cy = rng.uniform(rows / 2 - 300, rows / 2 + 300, n_cells)
        for cell, (x, y) in enumerate(zip(cx, cy, strict=True), start=1):
            r0, c0 = int(y) - 6, int(x) - 6
            image[r0 : r0 + 12, c0 : c0 + 12] = (200, 80, 220)
            labels[r0 : r0 + 12, c0 : c0 + 12] = cell
            kinds = rng.choice(n_targets, size=3, replace=False)
            n = rng.poisson(20, 3)
            row = dict.fromkeys(targets, 0)
            for k, m in zip(kinds, n, strict=True):
                row[targets[k]] = int(m)
                for _ in range(int(m)):
                    lx, ly = x + rng.normal(0, 4), y + rng.normal(0, 4)
                    tx.append({"fov": fov, "cell_ID": cell, "x_global_px": lx + x_off, "y_global_px": ly + y_off,
                               "x_local_px": lx, "y_local_px": ly, "z": 0, "target": targets[k],
                               "CellComp": "Nuclear"})  # fmt: skip
            counts.append({"fov": fov, "cell_ID": cell, **row})
            meta.append({"fov": fov, "cell_ID": cell, "Area": 144, "CenterX_local_px": x, "CenterY_local_px": y,
                         "CenterX_global_px": x + x_off, "CenterY_global_px": y + y_off})  # fmt: skip
        Image.fromarray(image).save(path / "CellComposite" / f"CellComposite_F{fov:03d}.jpg", quality=90)
        tifffile.imwrite(path / "CellLabels" / f"CellLabels_F{fov:03d}.tif", labels, compression="zlib")
    pd.DataFrame(counts).to_csv(path / f"{dataset_id}_exprMat_file.csv", index=False)
    pd.DataFrame(meta).to_csv(path / f"{dataset_id}_metadata_file.csv", index=False)
    pd.DataFrame(positions).to_csv(path / f"{dataset_id}_fov_positions_file.csv", index=False)
    pd.DataFrame(tx).to_csv(path / f"{dataset_id}_tx_file.csv", index=False)
    return {"um_per_px": um, "fovs": fovs, "targets": targets, "shape": (rows, cols)}
