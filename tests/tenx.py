"""Writers of small but complete 10x Genomics output folders (Visium, Visium HD, Xenium), for reader tests.

Every file that :mod:`spatialdata_io` 0.7's readers open is written in the format 10x's pipelines use, so a folder
can be read with ``spatialdata_io.visium``, ``spatialdata_io.visium_hd`` or ``spatialdata_io.xenium`` exactly as a
real one would be. The writers take plain arrays; :func:`from_synthetic` builds those from diffst's own synthetic
tissue (:func:`diffst.datasets.synthetic_xenium`) and returns the ground truth next to the folder.

Conventions
-----------
- Full-resolution pixel coordinates (``pxl_row_in_fullres``, ``pxl_col_in_fullres``, polygons of Visium HD cells)
  are continuous coordinates of the full-resolution image as spatialdata uses them: pixel ``(row, col)`` covers
  ``[col, col + 1) × [row, row + 1)``.
- Visium: ``scalefactors_json.json`` follows 10x: ``spot_diameter_fullres`` is the full-resolution pixel width of a
  **65 µm** spot (the spot is 55 µm, 10x's number includes a margin), ``fiducial_diameter_fullres`` that of a
  fiducial (about 105 µm).
- Visium HD: ``spot_diameter_fullres`` is the bin side in full-resolution pixels (Space Ranger 3; the reader checks
  ``bin_size_um / spot_diameter_fullres == microns_per_pixel``).
- Xenium: transcript and boundary coordinates are µm; the morphology image has ``pixel_size`` µm pixels whose
  corner is at µm ``(0, 0)``.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
import tifffile
from PIL import Image

__all__ = [
    "Folder",
    "XENIUM_STAINS",
    "XeniumCells",
    "HDCells",
    "barcodes",
    "hex_lattice",
    "write_10x_h5",
    "write_visium",
    "write_visium_hd",
    "write_xenium",
    "xenium_cell_ids",
    "grid_cells",
    "multimodal_stains",
    "from_synthetic",
]

VISIUM_SPOT_UM = 55.0  # the capture spot
VISIUM_SCALEFACTOR_SPOT_UM = 65.0  # what 10x's spot_diameter_fullres measures
VISIUM_FIDUCIAL_UM = 65.0 * 144.4 / 89.4  # ratio of fiducial to spot diameter in Space Ranger's scalefactors (~105 µm)
VISIUM_PITCH_UM = 100.0
# XOA ≥ 2.0 with the multimodal cell segmentation kit: one morphology_focus_000k.ome.tif per stain, in this order
# (spatialdata-io 0.7's xenium reader names the channels after these constants, not after the files' OME-XML)
XENIUM_STAINS = ("DAPI", "ATP1A1/CD45/E-Cadherin", "18S", "AlphaSMA/Vimentin")


# --------------------------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------------------------
def barcodes(n: int, *, suffix: str = "-1", salt: int = 0) -> np.ndarray:
    """``n`` distinct 16-nt barcodes with ``suffix`` (a bijection of the index, so always unique)."""
    idx = (np.arange(n, dtype=np.uint64) + np.uint64(salt)) * np.uint64(2654435761) + np.uint64(12345)
    codes = idx & np.uint64(0xFFFFFFFF)  # odd multiplier: a bijection of 32-bit ints, i.e. of 16 nt
    digits = (codes[:, None] >> (2 * np.arange(15, -1, -1, dtype=np.uint64))) & np.uint64(3)
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)[digits.astype(np.int64)]
    return np.char.add(letters.view("S16").ravel().astype("U16"), suffix)


def write_10x_h5(
    path: str | Path,
    counts: Any,
    genes: Sequence[str],
    barcodes: Sequence[str],
    *,
    gene_ids: Sequence[str] | None = None,
    feature_types: Sequence[str] | str = "Gene Expression",
    genome: str = "GRCh38",
    library_id: str | None = None,
    chemistry: str = "Visium V2 Slide",
    software_version: str = "spaceranger-2.1.0",
) -> Path:
    """A Cell Ranger ≥ 3 / Space Ranger / Xenium feature-barcode matrix (``matrix/`` group, CSC of genes × barcodes).

    ``counts`` is ``(n_barcodes, n_genes)`` of integer counts (dense or sparse); stored as int32 like 10x does.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = sp.csr_matrix(counts)
    x.sum_duplicates()
    x.eliminate_zeros()
    n_bc, n_genes = x.shape
    if len(genes) != n_genes or len(barcodes) != n_bc:
        msg = f"counts is {x.shape} but there are {len(barcodes)} barcodes and {len(genes)} genes"
        raise ValueError(msg)
    data = x.data
    if not np.allclose(data, np.round(data)):
        raise ValueError("counts must be integers")
    if isinstance(feature_types, str):
        feature_types = [feature_types] * n_genes
    gene_ids = list(gene_ids) if gene_ids is not None else [f"ENSG{i + 1:011d}" for i in range(n_genes)]
    with h5py.File(path, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        f.attrs["chemistry_description"] = chemistry
        f.attrs["software_version"] = software_version
        f.attrs["library_ids"] = np.array([(library_id or "library").encode()])
        f.attrs["original_gem_groups"] = np.array([1])
        m = f.create_group("matrix")
        # csr over barcodes == csc of the (genes x barcodes) matrix 10x stores
        m.create_dataset("barcodes", data=np.array([str(b).encode() for b in barcodes], dtype=f"S{_w(barcodes)}"))
        m.create_dataset("data", data=np.round(data).astype(np.int32), compression="gzip")
        m.create_dataset("indices", data=x.indices.astype(np.int64), compression="gzip")
        m.create_dataset("indptr", data=x.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array([n_genes, n_bc], dtype=np.int32))
        feats = m.create_group("features")
        feats.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        feats.create_dataset("id", data=np.array([g.encode() for g in gene_ids], dtype=f"S{_w(gene_ids)}"))
        feats.create_dataset("name", data=np.array([str(g).encode() for g in genes], dtype=f"S{_w(genes)}"))
        feats.create_dataset(
            "feature_type", data=np.array([t.encode() for t in feature_types], dtype=f"S{_w(feature_types)}")
        )
        feats.create_dataset("genome", data=np.array([genome.encode()] * n_genes, dtype=f"S{max(1, len(genome))}"))
    return path


def _w(strings: Sequence[Any]) -> int:
    return max([1, *(len(str(s).encode()) for s in strings)])


def _resize(image_rgb: np.ndarray, scalef: float) -> np.ndarray:
    h, w = image_rgb.shape[:2]
    size = (max(1, int(round(w * scalef))), max(1, int(round(h * scalef))))
    return np.asarray(Image.fromarray(image_rgb).resize(size, Image.Resampling.BILINEAR))


def _scalefs(shape: tuple[int, ...], hires_scalef: float | None, lowres_scalef: float | None) -> tuple[float, float]:
    """Space Ranger makes the hires image 2000 px and the lowres 600 px on their longest side; small test images are
    still downscaled (by 2 and by ~7) so that the scale factors matter."""
    longest = max(shape[:2])
    hires = hires_scalef if hires_scalef is not None else min(0.5, 2000.0 / longest)
    lowres = lowres_scalef if lowres_scalef is not None else min(0.15, 600.0 / longest)
    return float(hires), float(lowres)


def _write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path)


def _write_rgb_tiff(path: Path, image_rgb: np.ndarray) -> None:
    """A plain (non-OME) RGB TIFF, as a microscope export: a single page ``(H, W, 3)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.ascontiguousarray(image_rgb), photometric="rgb")


def _check_rgb(image_rgb: np.ndarray) -> np.ndarray:
    image_rgb = np.asarray(image_rgb)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        msg = f"image_rgb must be (H, W, 3) uint8; got {image_rgb.shape} {image_rgb.dtype}"
        raise ValueError(msg)
    return image_rgb


@dataclass
class Folder:
    """A written output folder and what is known about it (the ground truth of the tests)."""

    kind: str
    path: Path
    dataset_id: str | None = None
    fullres_image: Path | None = None
    um_per_px: float | None = None  # µm per full-resolution (Visium) or morphology (Xenium) pixel
    genes: list[str] = field(default_factory=list)
    truth: dict[str, Any] = field(default_factory=dict)

    def reader_kwargs(self) -> dict[str, Any]:
        return {"dataset_id": self.dataset_id} if self.dataset_id else {}


# --------------------------------------------------------------------------------------------------------------------
# Visium
# --------------------------------------------------------------------------------------------------------------------
def hex_lattice(width_um: float, height_um: float, *, margin_um: float = VISIUM_SPOT_UM / 2) -> pd.DataFrame:
    """Visium spot centres (µm) inside ``[0, width] x [0, height]``: 100 µm pitch, rows 100·√3/2 µm apart, ``array_col``
    in steps of 2 along a row, odd rows offset by one column (``array_row + array_col`` even)."""
    dy = VISIUM_PITCH_UM * math.sqrt(3) / 2
    rows = []
    r = 0
    while margin_um + r * dy <= height_um - margin_um + 1e-9:
        y = margin_um + r * dy
        c = r % 2
        while margin_um + c * VISIUM_PITCH_UM / 2 <= width_um - margin_um + 1e-9:
            rows.append((r, c, margin_um + c * VISIUM_PITCH_UM / 2, y))
            c += 2
        r += 1
    return pd.DataFrame(rows, columns=["array_row", "array_col", "x_um", "y_um"])


def write_visium(
    path: str | Path,
    *,
    counts: Any,
    genes: Sequence[str],
    array_row: Sequence[int],
    array_col: Sequence[int],
    pxl_row: Sequence[float],
    pxl_col: Sequence[float],
    image_rgb: np.ndarray,
    um_per_px: float,
    barcodes_: Sequence[str] | None = None,
    in_tissue: Sequence[bool] | None = None,
    positions: Literal["csv", "csv_v1", "csv_v1_header"] = "csv",
    write_fullres_tiff: bool = True,
    fullres_name: str = "tissue_image.tif",
    library_id: str | None = None,
    hires_scalef: float | None = None,
    lowres_scalef: float | None = None,
    round_pixels: bool = False,
) -> Path | None:
    """Write a Space Ranger Visium ``outs/`` folder; returns the path of the full-resolution TIFF (or ``None``).

    Parameters
    ----------
    counts
        ``(n_spots, n_genes)`` integer counts of every spot of the lattice listed (rows where ``in_tissue`` is false
        are only listed in the positions file, as Space Ranger lists all 4992 spots there).
    array_row, array_col, pxl_row, pxl_col
        Lattice indices and full-resolution pixel coordinates of the spot centres.
    image_rgb
        Full-resolution H&E ``(H, W, 3)`` uint8.
    um_per_px
        µm per full-resolution pixel (sets ``spot_diameter_fullres = 65 / um_per_px``).
    positions
        ``"csv"``: ``spatial/tissue_positions.csv`` with header (Space Ranger ≥ 2); ``"csv_v1"``:
        ``spatial/tissue_positions_list.csv`` without header (Space Ranger 1); ``"csv_v1_header"``: the 1.x file name
        with a header (seen in the wild, spatialdata-io issue 146). Space Ranger's parquet form is not read by
        spatialdata-io 0.7's ``visium`` reader, so it is not offered.
    library_id
        When given, the counts file is ``{library_id}_filtered_feature_bc_matrix.h5`` (downloaded datasets), from which
        the reader infers ``dataset_id``; otherwise it is unprefixed (``outs/``) and the reader needs ``dataset_id``.
    round_pixels
        Write integer pixel coordinates (Space Ranger 1.x/2.x do).
    """
    path = Path(path)
    (path / "spatial").mkdir(parents=True, exist_ok=True)
    image_rgb = _check_rgb(image_rgb)
    x = sp.csr_matrix(counts)
    n = x.shape[0]
    in_tissue = np.ones(n, bool) if in_tissue is None else np.asarray(in_tissue, bool)
    bc = np.asarray(barcodes_ if barcodes_ is not None else barcodes(n), dtype=object)
    if len(set(bc)) != n:
        raise ValueError("barcodes must be unique")

    # counts: in-tissue spots only, barcodes sorted as in a filtered matrix
    keep = np.flatnonzero(in_tissue)
    keep = keep[np.argsort(bc[keep].astype(str), kind="stable")]
    counts_name = f"{library_id}_filtered_feature_bc_matrix.h5" if library_id else "filtered_feature_bc_matrix.h5"
    write_10x_h5(path / counts_name, x[keep], genes, list(bc[keep]), library_id=library_id)

    # positions: all spots, in lattice order
    prow = np.asarray(pxl_row, float)
    pcol = np.asarray(pxl_col, float)
    if round_pixels:
        prow, pcol = np.round(prow).astype(np.int64), np.round(pcol).astype(np.int64)
    df = pd.DataFrame(
        {
            "barcode": bc,
            "in_tissue": in_tissue.astype(np.int64),
            "array_row": np.asarray(array_row, np.int64),
            "array_col": np.asarray(array_col, np.int64),
            "pxl_row_in_fullres": prow,
            "pxl_col_in_fullres": pcol,
        }
    )
    if positions == "csv":
        df.to_csv(path / "spatial" / "tissue_positions.csv", index=False)
    elif positions == "csv_v1":
        df.to_csv(path / "spatial" / "tissue_positions_list.csv", index=False, header=False)
    elif positions == "csv_v1_header":
        df.to_csv(path / "spatial" / "tissue_positions_list.csv", index=False)
    else:
        msg = f"positions={positions!r}: use 'csv', 'csv_v1' or 'csv_v1_header'"
        raise ValueError(msg)

    hires, lowres = _scalefs(image_rgb.shape, hires_scalef, lowres_scalef)
    scalefactors = {
        "spot_diameter_fullres": VISIUM_SCALEFACTOR_SPOT_UM / um_per_px,
        "tissue_hires_scalef": hires,
        "fiducial_diameter_fullres": VISIUM_FIDUCIAL_UM / um_per_px,
        "tissue_lowres_scalef": lowres,
    }
    (path / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors, indent=4))
    _write_png(path / "spatial" / "tissue_hires_image.png", _resize(image_rgb, hires))
    _write_png(path / "spatial" / "tissue_lowres_image.png", _resize(image_rgb, lowres))
    if write_fullres_tiff:
        _write_rgb_tiff(path / fullres_name, image_rgb)
        return path / fullres_name
    return None


# --------------------------------------------------------------------------------------------------------------------
# Visium HD
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class HDCells:
    """Space Ranger ≥ 4 cell segmentation of a Visium HD slide: polygons in full-resolution pixels and counts."""

    polygons_px: list[np.ndarray]  # (k, 2) x, y rings in full-resolution pixels, one per cell
    counts: Any  # (n_cells, n_genes)


def write_visium_hd(
    path: str | Path,
    *,
    counts: np.ndarray,
    genes: Sequence[str],
    image_rgb: np.ndarray,
    um_per_px: float,
    origin_px: tuple[float, float] = (0.0, 0.0),
    in_tissue: np.ndarray | None = None,
    bin_sizes: Sequence[int] = (2, 8, 16),
    cells: HDCells | None = None,
    fullres: Literal["tissue_image", "microscope_image"] | None = "tissue_image",
    prefix: str = "",
    hires_scalef: float | None = None,
    lowres_scalef: float | None = None,
    software_version: str = "spaceranger-3.1.2",
) -> Path | None:
    """Write a Space Ranger 3 Visium HD ``outs/`` folder from 2 µm bin counts; returns the full-resolution TIFF path.

    Parameters
    ----------
    counts
        ``(rows, cols, n_genes)`` integer counts of the 2 µm bins; bin ``(r, c)`` covers µm
        ``[2c, 2c + 2) x [2r, 2r + 2)`` of the bin grid, whose corner sits at full-resolution pixel ``origin_px``
        (x, y); ``array_row = r`` grows with y and ``array_col = c`` with x. Larger bins are sums of 2 µm bins (the
        grid padded with empty bins to whole larger bins).
    in_tissue
        ``(rows, cols)`` bool of 2 µm bins under tissue (default all); a larger bin is under tissue when one of its
        2 µm bins is. Filtered matrices list the bins under tissue; ``tissue_positions.parquet`` lists all.
    cells
        Optional cell segmentation, written to ``segmented_outputs/`` (what ``load_segmentations_only`` reads).
    fullres
        Where the full-resolution TIFF goes: ``"tissue_image"`` (``{prefix}tissue_image.tif`` next to
        ``{prefix}feature_slice.h5``, as in 10x's downloads), ``"microscope_image"`` (``microscope_image/image.tif``)
        or ``None`` (only ``tissue_image.tif`` in a ``_fullres/`` sibling folder, for ``fullres_image_file=``).
    prefix
        Prefix of the top-level files (e.g. ``"Visium_HD_Human_"``); the reader infers ``dataset_id`` from it.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    image_rgb = _check_rgb(image_rgb)
    counts = np.asarray(counts)
    if counts.ndim != 3 or counts.shape[2] != len(genes):
        raise ValueError(f"counts must be (rows, cols, {len(genes)}); got {counts.shape}")
    n_rows, n_cols, n_genes = counts.shape
    tissue = np.ones((n_rows, n_cols), bool) if in_tissue is None else np.asarray(in_tissue, bool)
    hires, lowres = _scalefs(image_rgb.shape, hires_scalef, lowres_scalef)
    if any(b % 2 for b in bin_sizes) or 2 not in bin_sizes:
        raise ValueError("bin_sizes must be even and include 2")

    def scalefactors(bin_um: float) -> dict[str, float]:
        return {
            "spot_diameter_fullres": bin_um / um_per_px,
            "bin_size_um": float(bin_um),
            "microns_per_pixel": float(um_per_px),
            "regist_target_img_scalef": hires,
            "tissue_lowres_scalef": lowres,
            "fiducial_diameter_fullres": VISIUM_FIDUCIAL_UM / um_per_px,
            "tissue_hires_scalef": hires,
        }

    # top level: spatial/ with the images and global scale factors, the feature slice with the layout metadata
    spatial = path / "spatial"
    spatial.mkdir(exist_ok=True)
    (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors(2), indent=4))
    _write_png(spatial / "tissue_hires_image.png", _resize(image_rgb, hires))
    _write_png(spatial / "tissue_lowres_image.png", _resize(image_rgb, lowres))
    eye = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    spot_to_px = [2 / um_per_px, 0.0, origin_px[0], 0.0, 2 / um_per_px, origin_px[1], 0.0, 0.0, 1.0]
    px_to_spot = np.linalg.inv(np.array(spot_to_px).reshape(3, 3)).ravel().tolist()
    metadata = {
        "hd_layout_json": json.dumps({"file_format": "1.0", "transform": eye, "num_rows": 3350, "num_cols": 3350}),
        "transform_matrices": {
            "cytassist_colrow_to_spot_colrow": eye,
            "spot_colrow_to_cytassist_colrow": eye,
            "microscope_colrow_to_spot_colrow": px_to_spot,
            "spot_colrow_to_microscope_colrow": spot_to_px,
        },
        "software_version": software_version,
    }
    with h5py.File(path / f"{prefix}feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps(metadata)
        f.attrs["software_version"] = software_version
        f.create_dataset("feature_names", data=np.array([g.encode() for g in genes]))

    # binned outputs
    for b in sorted(bin_sizes):
        k = b // 2
        rr, cc = -(-n_rows // k), -(-n_cols // k)
        padded = np.zeros((rr * k, cc * k, n_genes), counts.dtype)
        padded[:n_rows, :n_cols] = counts
        agg = padded.reshape(rr, k, cc, k, n_genes).sum(axis=(1, 3))
        tpad = np.zeros((rr * k, cc * k), bool)
        tpad[:n_rows, :n_cols] = tissue
        tis = tpad.reshape(rr, k, cc, k).any(axis=(1, 3))
        r_idx, c_idx = np.meshgrid(np.arange(rr), np.arange(cc), indexing="ij")
        r_idx, c_idx = r_idx.ravel(), c_idx.ravel()
        bc = np.array([f"s_{b:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(r_idx, c_idx, strict=True)], dtype=object)
        d = path / "binned_outputs" / f"square_{b:03d}um"
        (d / "spatial").mkdir(parents=True, exist_ok=True)
        flat = agg.reshape(rr * cc, n_genes)
        keep = np.flatnonzero(tis.ravel())
        write_10x_h5(
            d / "filtered_feature_bc_matrix.h5",
            flat[keep],
            genes,
            list(bc[keep]),
            chemistry="Visium HD v1",
            software_version=software_version,
        )
        side_px = b / um_per_px
        pos = pd.DataFrame(
            {
                "barcode": bc.astype(str),
                "in_tissue": tis.ravel().astype(np.int32),
                "array_row": r_idx.astype(np.int32),
                "array_col": c_idx.astype(np.int32),
                "pxl_row_in_fullres": origin_px[1] + (r_idx + 0.5) * side_px,
                "pxl_col_in_fullres": origin_px[0] + (c_idx + 0.5) * side_px,
            }
        )
        pq.write_table(pa.Table.from_pandas(pos, preserve_index=False), d / "spatial" / "tissue_positions.parquet")
        (d / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors(b), indent=4))

    if cells is not None:
        seg = path / "segmented_outputs"
        (seg / "spatial").mkdir(parents=True, exist_ok=True)
        ids = np.arange(1, len(cells.polygons_px) + 1)
        names = [f"cellid_{i:09d}-1" for i in ids]
        write_10x_h5(
            seg / "filtered_feature_cell_matrix.h5",
            cells.counts,
            genes,
            names,
            chemistry="Visium HD v1",
            software_version=software_version,
        )
        features = []
        for i, ring in zip(ids, cells.polygons_px, strict=True):
            ring = np.asarray(ring, float)
            if not np.allclose(ring[0], ring[-1]):
                ring = np.vstack([ring, ring[:1]])
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [ring.round(3).tolist()]},
                    "properties": {"cell_id": int(i)},
                }
            )
        (seg / "cell_segmentations.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
        (seg / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors(2), indent=4))

    if fullres == "tissue_image":
        out = path / f"{prefix}tissue_image.tif"
    elif fullres == "microscope_image":
        out = path / "microscope_image" / "image.tif"
    else:
        out = path.parent / f"{path.name}_fullres" / "tissue_image.tif"
    _write_rgb_tiff(out, image_rgb)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Xenium
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class XeniumCells:
    """Cell and nucleus segmentation in µm: one polygon per cell, nuclei with the index of their cell."""

    cell_polygons_um: list[np.ndarray]  # (k, 2) x, y rings
    nucleus_polygons_um: list[np.ndarray]
    nucleus_cell: np.ndarray | None = None  # cell index of each nucleus (default: nucleus i in cell i)
    ids: Sequence[str] | None = None  # Xenium cell ids ("aaaabcde-1"); default generated


def xenium_cell_ids(prefix: np.ndarray, suffix: int | np.ndarray = 1) -> np.ndarray:
    """Xenium's cell id strings from the uint32 ``(prefix, suffix)`` pairs of ``cells.zarr.zip``."""
    prefix = np.asarray(prefix, dtype=np.uint32)
    nibbles = (prefix[:, None] >> np.arange(28, -1, -4, dtype=np.uint32)) & 0xF
    chars = (nibbles + ord("a")).astype(np.uint8).view("S8").ravel().astype("U8")
    return np.char.add(np.char.add(chars, "-"), np.broadcast_to(np.asarray(suffix).astype(str), prefix.shape))


def _xenium_prefix(ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    pre, suf = zip(*(str(s).split("-") for s in ids), strict=True)
    codes = np.frombuffer("".join(pre).encode(), dtype=np.uint8).reshape(-1, 8).astype(np.uint32) - ord("a")
    prefix = (codes << np.arange(28, -1, -4, dtype=np.uint32)).sum(axis=1).astype(np.uint32)
    return prefix, np.array([int(s) for s in suf], dtype=np.uint32)


def grid_cells(extent_um: tuple[float, float, float, float], side_um: float = 20.0) -> XeniumCells:
    """Square cells tiling ``(x0, y0, x1, y1)`` with a square nucleus of 40 % of the side in each."""
    x0, y0, x1, y1 = extent_um
    xs = np.arange(x0, x1 - side_um / 2, side_um)
    ys = np.arange(y0, y1 - side_um / 2, side_um)
    cells, nuclei = [], []
    for y in ys:
        for x in xs:
            cells.append(_square(x + side_um / 2, y + side_um / 2, side_um * 0.98))
            nuclei.append(_square(x + side_um / 2, y + side_um / 2, side_um * 0.4))
    return XeniumCells(cells, nuclei)


def _square(cx: float, cy: float, s: float) -> np.ndarray:
    h = s / 2
    return np.array([[cx - h, cy - h], [cx + h, cy - h], [cx + h, cy + h], [cx - h, cy + h], [cx - h, cy - h]])


def _closed(ring: np.ndarray) -> np.ndarray:
    ring = np.asarray(ring, dtype=np.float64)
    return ring if np.allclose(ring[0], ring[-1]) else np.vstack([ring, ring[:1]])


def _rasterise(polygons_um: list[np.ndarray], labels: np.ndarray, shape: tuple[int, int], pixel_size: float):
    from skimage.draw import polygon as draw_polygon

    out = np.zeros(shape, dtype=np.uint32)
    for ring, lab in zip(polygons_um, labels, strict=True):
        ring = np.asarray(ring) / pixel_size - 0.5  # pixel centres at (i + 0.5) · pixel_size µm
        rr, cc = draw_polygon(ring[:, 1], ring[:, 0], shape=shape)
        out[rr, cc] = lab
    return out


def _ome_tiff(path: Path, data: np.ndarray, *, pixel_size: float, axes: str, channels: list[str] | None) -> None:
    """An OME-TIFF with a SubIFD pyramid (halving until the short side is < 512), tiled, like XOA writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    spatial = (0, 1) if axes in ("YX", "YXS") else (1, 2)
    levels = [data]
    while min(levels[-1].shape[i] for i in spatial) >= 1024:
        a = levels[-1]
        if axes == "YXS":
            h, w = (a.shape[0] // 2) * 2, (a.shape[1] // 2) * 2
            a = a[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).mean(axis=(1, 3))
        elif axes == "YX":
            h, w = (a.shape[0] // 2) * 2, (a.shape[1] // 2) * 2
            a = a[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        else:
            h, w = (a.shape[1] // 2) * 2, (a.shape[2] // 2) * 2
            a = a[:, :h, :w].reshape(a.shape[0], h // 2, 2, w // 2, 2).mean(axis=(2, 4))
        levels.append(a.astype(data.dtype))
    metadata: dict[str, Any] = {
        "axes": axes,
        "PhysicalSizeX": pixel_size,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": pixel_size,
        "PhysicalSizeYUnit": "µm",
    }
    if channels:
        metadata["Channel"] = {"Name": channels}
    opts = {
        "tile": (256, 256),
        "compression": "zlib",
        "photometric": "rgb" if axes == "YXS" else "minisblack",
        "resolutionunit": "CENTIMETER",
    }
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        for k, lev in enumerate(levels):
            res = (1e4 / (pixel_size * 2**k), 1e4 / (pixel_size * 2**k))
            if k == 0:
                tif.write(lev, subifds=len(levels) - 1, resolution=res, metadata=metadata, **opts)
            else:
                tif.write(lev, subfiletype=1, resolution=res, metadata=None, **opts)


def _pyramid(a: np.ndarray) -> list[np.ndarray]:
    """``(Y, X)`` then 2x means until the short side is < 1024 (as :func:`_ome_tiff`)."""
    levels = [a]
    while min(levels[-1].shape) >= 1024:
        b = levels[-1]
        h, w = (b.shape[0] // 2) * 2, (b.shape[1] // 2) * 2
        levels.append(b[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)).astype(a.dtype))
    return levels


def _ome_tiff_multifile(
    folder: Path, stack: np.ndarray, *, pixel_size: float, channels: Sequence[str], name: str
) -> list[Path]:
    """One OME-TIFF per channel of ``stack`` ``(C, Y, X)``, as XOA ≥ 2.0 writes the multimodal morphology images.

    File ``k`` is ``name.format(k)``; its first IFD is channel ``k`` (with a SubIFD pyramid) and its OME-XML describes
    the whole ``C``-channel image, each plane a ``TiffData`` naming its file by ``UUID FileName``, so that reading the
    first file with tifffile (what ``dask_image.imread`` does through pims) gives all channels, ``(C, Y, X)``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n_c, h, w = stack.shape
    if len(channels) != n_c:
        raise ValueError(f"{n_c} planes but {len(channels)} channel names")
    files = [name.format(k) for k in range(n_c)]
    uuids = [f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, str(folder / f))}" for f in files]
    dtype = {np.dtype(np.uint16): "uint16", np.dtype(np.uint8): "uint8"}[stack.dtype]
    # TIFF strings are 7-bit ASCII: µ as a character reference
    unit = 'PhysicalSizeXUnit="&#181;m" PhysicalSizeYUnit="&#181;m"'
    chans = "".join(
        f'<Channel ID="Channel:0:{c}" Name="{_xml_attr(n)}" SamplesPerPixel="1" />' for c, n in enumerate(channels)
    )
    tiffdata = "".join(
        f'<TiffData FirstC="{c}" FirstT="0" FirstZ="0" IFD="0" PlaneCount="1">'
        f'<UUID FileName="{files[c]}">{uuids[c]}</UUID></TiffData>'
        for c in range(n_c)
    )
    out = []
    for k in range(n_c):
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            'xsi:schemaLocation="http://www.openmicroscopy.org/Schemas/OME/2016-06 '
            'http://www.openmicroscopy.org/Schemas/OME/2016-06/ome.xsd" '
            f'UUID="{uuids[k]}" Creator="diffst tests (XOA 2.0 layout)">'
            '<Image ID="Image:0" Name="morphology_focus">'
            f'<Pixels ID="Pixels:0" DimensionOrder="XYZCT" Type="{dtype}" SizeX="{w}" SizeY="{h}" SizeZ="1" '
            f'SizeC="{n_c}" SizeT="1" PhysicalSizeX="{pixel_size}" PhysicalSizeY="{pixel_size}" {unit}>'
            f"{chans}{tiffdata}</Pixels></Image></OME>"
        )
        levels = _pyramid(np.ascontiguousarray(stack[k]))
        opts: dict[str, Any] = {"tile": (256, 256), "compression": "zlib", "photometric": "minisblack"}
        with tifffile.TiffWriter(folder / files[k], bigtiff=True) as tif:
            for i, lev in enumerate(levels):
                res = (1e4 / (pixel_size * 2**i), 1e4 / (pixel_size * 2**i))
                if i == 0:
                    tif.write(
                        lev,
                        subifds=len(levels) - 1,
                        description=xml,
                        metadata=None,
                        resolution=res,
                        resolutionunit="CENTIMETER",
                        **opts,
                    )
                else:
                    tif.write(lev, subfiletype=1, metadata=None, resolution=res, resolutionunit="CENTIMETER", **opts)
        out.append(folder / files[k])
    return out


def _xml_attr(s: str) -> str:
    return s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def multimodal_stains(
    dapi: np.ndarray, cell_mask: np.ndarray, nucleus_mask: np.ndarray, *, seed: int = 0
) -> np.ndarray:
    """The four XOA 2.0 morphology stains ``(4, Y, X)`` uint16 (order :data:`XENIUM_STAINS`) from DAPI and the masks.

    ``DAPI`` is ``dapi`` itself; the boundary stain is the cell outlines (label changes of ``cell_mask``), 18S the
    cell interiors outside nuclei, AlphaSMA/Vimentin the interiors of every third cell, each blurred and with
    Poisson noise; so none of the three looks like the nuclear signal.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    lab = cell_mask.astype(np.int64)
    edge = np.zeros(lab.shape, bool)
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    cyto = (lab > 0) & (nucleus_mask == 0)
    stromal = cyto & (lab % 3 == 0)

    def stain(mask: np.ndarray, sigma: float, peak: float, floor: float) -> np.ndarray:
        smooth = ndimage.gaussian_filter(mask.astype(np.float32), sigma)
        smooth = smooth / max(float(smooth.max()), 1e-6)
        return np.clip(rng.poisson(floor + peak * smooth), 0, 65535).astype(np.uint16)

    return np.stack(
        [
            np.asarray(dapi, np.uint16),
            stain(edge, 1.5, 1500.0, 40.0),
            stain(cyto, 3.0, 900.0, 60.0),
            stain(stromal, 2.0, 1200.0, 30.0),
        ]
    )


_CONTROL_TYPES = (
    ("NegControlProbe_", "Negative Control Probe", "control_probe_counts"),
    ("NegControlCodeword_", "Negative Control Codeword", "control_codeword_counts"),
    ("UnassignedCodeword_", "Unassigned Codeword", "unassigned_codeword_counts"),
    ("BLANK_", "Deprecated Codeword", "deprecated_codeword_counts"),
    ("GenomicControl", "Genomic Control", "genomic_control_counts"),
)


def _feature_type(name: str) -> str:
    for prefix, ftype, _ in _CONTROL_TYPES:
        if name.startswith(prefix):
            return ftype
    return "Gene Expression"


def write_xenium(
    path: str | Path,
    *,
    transcripts: pd.DataFrame,
    morphology: np.ndarray,
    pixel_size: float = 0.2125,
    cells: XeniumCells | None = None,
    he_image: np.ndarray | None = None,
    he_to_morphology: np.ndarray | None = None,
    layout: Literal["v2", "v1"] = "v2",
    stains: Literal["dapi", "multimodal"] = "dapi",
    software_version: str | None = None,
    he_prefix: str = "slide",
    seed: int = 0,
) -> Path:
    """Write a Xenium Onboard Analysis output folder.

    Parameters
    ----------
    transcripts
        Columns ``x_location``, ``y_location`` (µm) and ``feature_name``; optional ``z_location``, ``qv``,
        ``transcript_id``. ``cell_id`` and ``overlaps_nucleus`` are derived from the segmentation masks (as XOA
        assigns transcripts) unless given. Feature names starting with ``NegControlProbe_``, ``NegControlCodeword_``,
        ``UnassignedCodeword_``, ``BLANK_`` or ``GenomicControl`` are control features.
    morphology
        DAPI ``(Y, X)`` uint16 (or ``(C, Y, X)``: its first channel is DAPI) with ``pixel_size`` µm pixels; written as
        ``morphology_focus/morphology_focus_0000.ome.tif`` (``layout="v2"``, XOA ≥ 2) or ``morphology_focus.ome.tif``
        and ``morphology_mip.ome.tif`` (``layout="v1"``, XOA 1.x).
    stains
        ``"dapi"``: the DAPI image only (no segmentation kit). ``"multimodal"`` (``layout="v2"`` only): the four stains
        of XOA 2.0's multimodal cell segmentation, :data:`XENIUM_STAINS`, one file each,
        ``morphology_focus/morphology_focus_0000.ome.tif`` … ``_0003.ome.tif`` (:func:`_ome_tiff_multifile`); the
        three non-DAPI stains are ``morphology[1:4]`` when ``morphology`` has 4 channels, else
        :func:`multimodal_stains` of the DAPI image and the segmentation (``seed`` for their noise).
    cells
        Segmentation; default :func:`grid_cells` over the morphology image.
    he_image, he_to_morphology
        Optional post-Xenium H&E ``(H, W, 3)`` uint8 and the 3x3 affine from its pixels to morphology pixels, written
        as ``{he_prefix}_he_image.ome.tif`` and ``{he_prefix}_he_imagealignment.csv``.
    layout
        ``"v2"``: XOA 2.0 (polygon_sets and nucleus_count in ``cells.zarr.zip``, ``label_id`` in boundaries, string
        feature names). ``"v1"``: XOA 1.9 (``seg_mask_value``, no ``label_id``, feature names as bytes).
    """
    import zarr

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    version = software_version or ("xenium-2.0.0.10" if layout == "v2" else "xenium-1.9.0.3")
    if stains not in ("dapi", "multimodal"):
        raise ValueError(f"stains={stains!r}: use 'dapi' or 'multimodal'")
    if stains == "multimodal" and layout != "v2":
        raise ValueError("the multimodal morphology stains are an XOA ≥ 2.0 layout: use layout='v2'")
    morph = np.asarray(morphology)
    dapi = (morph[0] if morph.ndim == 3 else morph).astype(np.uint16)
    shape = dapi.shape
    if cells is None:
        cells = grid_cells((0.0, 0.0, shape[1] * pixel_size, shape[0] * pixel_size))
    import shapely

    n_cells = len(cells.cell_polygons_um)
    cell_rings = [_closed(r) for r in cells.cell_polygons_um]
    nuc_rings = [_closed(r) for r in cells.nucleus_polygons_um]
    nuc_cell = np.arange(len(nuc_rings)) if cells.nucleus_cell is None else np.asarray(cells.nucleus_cell, np.int64)
    if cells.ids is not None:
        prefix, suffix = _xenium_prefix(cells.ids)
        ids = np.asarray(cells.ids).astype(str)
    else:
        prefix = (np.uint32(2**28) + np.arange(n_cells, dtype=np.uint32) * np.uint32(7919)).astype(np.uint32)
        suffix = np.ones(n_cells, np.uint32)
        ids = xenium_cell_ids(prefix, suffix)
    assert (xenium_cell_ids(prefix, suffix) == ids).all()

    cell_poly = shapely.polygons(cell_rings)
    nuc_poly = shapely.polygons(nuc_rings)
    cell_area = shapely.area(cell_poly)
    nuc_area_per_cell = np.bincount(nuc_cell, weights=shapely.area(nuc_poly), minlength=n_cells)
    nucleus_count = np.bincount(nuc_cell, minlength=n_cells)
    cent = shapely.centroid(cell_poly)
    cx, cy = shapely.get_x(cent), shapely.get_y(cent)
    ncent = shapely.centroid(nuc_poly)
    ncx = np.full(n_cells, np.nan)
    ncy = np.full(n_cells, np.nan)
    ncx[nuc_cell[::-1]] = shapely.get_x(ncent)[::-1]  # first nucleus of each cell
    ncy[nuc_cell[::-1]] = shapely.get_y(ncent)[::-1]

    cell_mask = _rasterise(cell_rings, np.arange(1, n_cells + 1), shape, pixel_size)
    nuc_mask = _rasterise(
        nuc_rings,
        (np.arange(1, len(nuc_rings) + 1) if layout == "v2" else nuc_cell + 1),
        shape,
        pixel_size,
    )

    # --- transcripts ---
    tx = transcripts.copy()
    n_tx = len(tx)
    for col in ("x_location", "y_location", "feature_name"):
        if col not in tx:
            raise ValueError(f"transcripts need a {col!r} column")
    px = np.clip((tx["x_location"].to_numpy() / pixel_size).astype(np.int64), 0, shape[1] - 1)
    py = np.clip((tx["y_location"].to_numpy() / pixel_size).astype(np.int64), 0, shape[0] - 1)
    if "cell_id" not in tx:
        lab = cell_mask[py, px].astype(np.int64)
        tx["cell_id"] = np.where(lab > 0, ids[np.maximum(lab - 1, 0)], "UNASSIGNED")
    if "overlaps_nucleus" not in tx:
        tx["overlaps_nucleus"] = (nuc_mask[py, px] > 0).astype(np.uint8)
    if "z_location" not in tx:
        tx["z_location"] = np.float32(5.0)
    if "qv" not in tx:
        tx["qv"] = np.float32(40.0)
    if "transcript_id" not in tx:
        tx["transcript_id"] = np.uint64(281474976710656) + np.arange(n_tx, dtype=np.uint64)
    names = tx["feature_name"].astype(str).to_numpy()
    columns = {
        "transcript_id": pa.array(tx["transcript_id"].to_numpy().astype(np.uint64)),
        "cell_id": pa.array(tx["cell_id"].astype(str).to_numpy()),
        "overlaps_nucleus": pa.array(tx["overlaps_nucleus"].to_numpy().astype(np.uint8)),
        "feature_name": pa.array([s.encode() for s in names], type=pa.binary()) if layout == "v1" else pa.array(names),
        "x_location": pa.array(tx["x_location"].to_numpy().astype(np.float32)),
        "y_location": pa.array(tx["y_location"].to_numpy().astype(np.float32)),
        "z_location": pa.array(tx["z_location"].to_numpy().astype(np.float32)),
        "qv": pa.array(tx["qv"].to_numpy().astype(np.float32)),
        "fov_name": pa.array(np.full(n_tx, "A1")),
        "nucleus_distance": pa.array(np.zeros(n_tx, np.float32)),
    }
    if layout == "v2":
        features = sorted(set(names))
        columns["codeword_index"] = pa.array(pd.Index(features).get_indexer(names).astype(np.int32))
        columns["is_gene"] = pa.array(np.array([_feature_type(s) == "Gene Expression" for s in names]))
    pq.write_table(pa.table(columns), path / "transcripts.parquet")

    # --- cell x feature matrix (genes first, then controls) and cells.parquet ---
    feats = list(dict.fromkeys(sorted(set(names), key=lambda s: (_feature_type(s) != "Gene Expression", s))))
    ftypes = [_feature_type(s) for s in feats]
    cid = tx["cell_id"].astype(str).to_numpy()
    pos = pd.Index(ids).get_indexer(cid)
    ok = pos >= 0
    fidx = pd.Index(feats).get_indexer(names)
    mat = sp.csr_matrix((np.ones(ok.sum()), (pos[ok], fidx[ok])), shape=(n_cells, len(feats)))
    mat.sum_duplicates()
    write_10x_h5(
        path / "cell_feature_matrix.h5",
        mat,
        feats,
        list(ids),
        gene_ids=feats,
        feature_types=ftypes,
        genome="Unknown",
        chemistry="Xenium",
        software_version=version,
    )
    dense = np.asarray(mat.todense())
    cells_df: dict[str, Any] = {
        "cell_id": ids,
        "x_centroid": cx,
        "y_centroid": cy,
        "transcript_counts": dense[:, np.array(ftypes) == "Gene Expression"].sum(axis=1).astype(np.int64),
    }
    for _, ftype, col in _CONTROL_TYPES:
        if col == "genomic_control_counts" and layout == "v1":
            continue
        cells_df[col] = dense[:, np.array(ftypes) == ftype].sum(axis=1).astype(np.int64)
    cells_df["total_counts"] = dense.sum(axis=1).astype(np.int64)
    cells_df["cell_area"] = cell_area
    cells_df["nucleus_area"] = np.where(nucleus_count > 0, nuc_area_per_cell, np.nan)
    if layout == "v2":
        cells_df["nucleus_count"] = nucleus_count.astype(np.int64)
        cells_df["segmentation_method"] = np.full(n_cells, "Segmented by nucleus expansion of 5.0µm")
    pd.DataFrame(cells_df).to_parquet(path / "cells.parquet", index=False)

    # --- boundaries ---
    def boundaries(rings: list[np.ndarray], owner: np.ndarray, label: np.ndarray) -> pa.Table:
        lens = np.array([len(r) for r in rings])
        xy = np.concatenate(rings).astype(np.float32)
        cols = {
            "cell_id": pa.array(np.repeat(ids[owner], lens)),
            "vertex_x": pa.array(xy[:, 0]),
            "vertex_y": pa.array(xy[:, 1]),
        }
        if layout == "v2":
            cols["label_id"] = pa.array(np.repeat(label, lens).astype(np.int64))
        return pa.table(cols)

    pq.write_table(
        boundaries(cell_rings, np.arange(n_cells), np.arange(1, n_cells + 1)), path / "cell_boundaries.parquet"
    )
    pq.write_table(
        boundaries(nuc_rings, nuc_cell, np.arange(1, len(nuc_rings) + 1)), path / "nucleus_boundaries.parquet"
    )

    # --- cells.zarr.zip ---
    summary_cols = [
        "cell_centroid_x",
        "cell_centroid_y",
        "cell_area",
        "nucleus_centroid_x",
        "nucleus_centroid_y",
        "nucleus_area",
        "z_level",
    ]
    summary = [cx, cy, cell_area, ncx, ncy, nuc_area_per_cell, np.zeros(n_cells)]
    if layout == "v2":
        summary_cols.append("nucleus_count")
        summary.append(nucleus_count.astype(np.float64))
    store = zarr.storage.ZipStore(path / "cells.zarr.zip", mode="w")
    try:
        # attributes at creation: a zip cannot overwrite a member (it would hold .zattrs twice)
        root = zarr.open_group(
            store=store, mode="w", zarr_format=2, attributes={"major_version": 6 if layout == "v2" else 5}
        )
        root.create_array("cell_id", data=np.column_stack([prefix, suffix]).astype(np.uint32))
        root.create_array(
            "cell_summary",
            data=np.column_stack(summary).astype(np.float64),
            attributes={"column_names": summary_cols},
        )
        masks = root.create_group("masks")
        masks.create_array("0", data=nuc_mask, chunks=(1024, 1024))
        masks.create_array("1", data=cell_mask, chunks=(1024, 1024))
        masks.create_array("homogeneous_transform", data=np.diag([1 / pixel_size, 1 / pixel_size, 1.0, 1.0]))
        if layout == "v2":
            ps_ = root.create_group("polygon_sets")
            for k, owner in ((0, nuc_cell), (1, np.arange(n_cells))):
                g = ps_.create_group(str(k))
                g.create_array("cell_index", data=owner.astype(np.uint32))
        else:
            root.create_array("seg_mask_value", data=np.arange(1, n_cells + 1, dtype=np.uint32))
    finally:
        store.close()

    # --- images ---
    if stains == "multimodal":
        if morph.ndim == 3 and morph.shape[0] == len(XENIUM_STAINS):
            stack = morph.astype(np.uint16)
        else:
            stack = multimodal_stains(dapi, cell_mask, nuc_mask, seed=seed)
        _ome_tiff_multifile(
            path / "morphology_focus",
            stack,
            pixel_size=pixel_size,
            channels=XENIUM_STAINS,
            name="morphology_focus_{:04d}.ome.tif",
        )
    elif layout == "v2":
        _ome_tiff(
            path / "morphology_focus" / "morphology_focus_0000.ome.tif",
            dapi,
            pixel_size=pixel_size,
            axes="YX",
            channels=["DAPI"],
        )
    else:
        for name in ("morphology_focus.ome.tif", "morphology_mip.ome.tif"):
            _ome_tiff(path / name, dapi, pixel_size=pixel_size, axes="YX", channels=["DAPI"])
    if he_image is not None:
        he = _check_rgb(he_image)
        m = np.eye(3) if he_to_morphology is None else np.asarray(he_to_morphology, float)
        he_px = pixel_size * math.sqrt(abs(np.linalg.det(m[:2, :2])))
        _ome_tiff(path / f"{he_prefix}_he_image.ome.tif", he, pixel_size=he_px, axes="YXS", channels=None)
        pd.DataFrame(m).to_csv(path / f"{he_prefix}_he_imagealignment.csv", header=False, index=False)

    # --- experiment.xenium and a few side files XOA writes ---
    specs = {
        "major_version": 5 if layout == "v2" else 4,
        "minor_version": 0,
        "patch_version": 0,
        "run_name": "diffst-test",
        "run_start_time": "2026-01-01T00:00:00Z",
        "region_name": "region_0",
        "preservation_method": "ffpe",
        "num_cells": int(n_cells),
        "transcripts_per_cell": float(mat.sum() / max(n_cells, 1)),
        "transcripts_per_100um": float(n_tx / max(1.0, shape[0] * shape[1] * pixel_size**2 / 1e4)),
        "cassette_name": "X0000000",
        "slide_id": "0000000",
        "panel_design_id": "diffst",
        "panel_name": "diffst test panel",
        "panel_organism": "Human",
        "panel_num_targets_predesigned": int(sum(t == "Gene Expression" for t in ftypes)),
        "panel_num_targets_custom": 0,
        "pixel_size": float(pixel_size),
        "instrument_sn": "0000",
        "instrument_sw_version": "2.0.0.0" if layout == "v2" else "1.9.0.0",
        "analysis_sw_version": version,
        "experiment_uuid": "00000000-0000-0000-0000-000000000000",
        "cassette_uuid": "00000000-0000-0000-0000-000000000000",
        "roi_uuid": "00000000-0000-0000-0000-000000000000",
        "z_step_size": 3.0,
        "well_uuid": "",
        "calibration_uuid": "",
        "images": {
            "morphology_filepath": "morphology.ome.tif",
            "morphology_focus_filepath": "morphology_focus.ome.tif",
        },
        "xenium_explorer_files": {
            "transcripts_zarr_filepath": "transcripts.zarr.zip",
            "cells_zarr_filepath": "cells.zarr.zip",
            "cell_features_zarr_filepath": "cell_feature_matrix.zarr.zip",
            "analysis_zarr_filepath": "analysis.zarr.zip",
            "analysis_summary_filepath": "analysis_summary.html",
        },
    }
    (path / "experiment.xenium").write_text(json.dumps(specs, indent=2))
    (path / "gene_panel.json").write_text(
        json.dumps({"payload": {"targets": [{"type": {"data": {"name": g}}} for g in feats]}})
    )
    return path


# --------------------------------------------------------------------------------------------------------------------
# From diffst's synthetic tissue
# --------------------------------------------------------------------------------------------------------------------
def _level0(image: Any) -> np.ndarray:
    """Full-resolution array (c, y, x) of a spatialdata image element (single- or multiscale)."""
    if hasattr(image, "children") and image.children:
        first = next(iter(image.children))
        return np.asarray(image[first]["image"].values)
    return np.asarray(image.values)


def _affine_um(sdata: Any, element: str, to_um: float) -> np.ndarray:
    """3x3 affine from an element's intrinsic x, y to µm (``global`` times the morphology pixel size)."""
    from spatialdata.transformations import get_transformation

    m = np.asarray(get_transformation(sdata[element], "global").to_affine_matrix(("x", "y"), ("x", "y")), float)
    return np.diag([to_um, to_um, 1.0]) @ m


def from_synthetic(
    kind: Literal["visium", "visium_hd", "xenium"],
    path: str | Path,
    *,
    seed: int = 0,
    size_um: float = 600.0,
    n_genes: int = 8,
    um_per_px: float | None = None,
    **kwargs: Any,
) -> Folder:
    """Write a 10x folder of ``kind`` from :func:`diffst.datasets.synthetic_xenium`'s tissue; return it with its truth.

    - ``"visium"``: spots are the tissue's gene transcripts summed over 55 µm discs on a 100 µm hexagonal lattice
      (:func:`hex_lattice`); spots with no counts are off tissue. The H&E has ``um_per_px`` (default 0.8) µm pixels
      and its corner is a little outside the field (synthetic scans have a 4 % margin), so pixel and µm coordinates
      differ by an offset. ``truth["spots"]``: barcode, array_row, array_col, x_um, y_um, pxl_row, pxl_col, in_tissue,
      the counts in ``truth["counts"]`` (spots x genes).
    - ``"visium_hd"``: the gene transcripts binned to 2 µm over the field (origin at µm (0, 0)), H&E at ``um_per_px``
      (default 0.5) µm; cells (``segmented_outputs/``) from the synthetic cell boundaries with their counts.
      ``truth["counts"]`` is the (rows, cols, genes) 2 µm array, ``truth["origin_px"]`` the grid corner.
    - ``"xenium"``: the transcripts themselves (controls included), the DAPI image at ``um_per_px`` (default 0.2125)
      µm, the synthetic cell and nucleus boundaries and the H&E with its alignment. ``truth["transcripts"]`` is the
      written table (``x_location``, ``y_location`` in µm, float32).

    Extra ``kwargs`` go to the writer (e.g. ``positions="csv_v1"``, ``layout="v1"``, ``stains="multimodal"``,
    ``fullres=None``); ``he_um_per_px`` and ``he_rotation_deg`` (Xenium) go to the synthetic generator.
    """
    import diffst as dst

    path = Path(path)
    gen: dict[str, Any] = {"size_um": size_um, "seed": seed, "n_genes": n_genes}
    if kind == "xenium":
        ps = um_per_px or 0.2125
        gen |= {
            "pixel_size_um": ps,
            "he_um_per_px": kwargs.pop("he_um_per_px", 0.5),
            "he_rotation_deg": kwargs.pop("he_rotation_deg", 0.0),
            "boundaries": True,
        }
    else:
        ps = 0.2125
        gen |= {
            "he_um_per_px": um_per_px or (0.8 if kind == "visium" else 0.5),
            "boundaries": kind == "visium_hd",
        }
    sdata = dst.datasets.synthetic_xenium(**gen)
    syn = sdata.attrs["synthetic"]
    genes = list(syn["genes"])
    w, h = syn["size_um"]
    df = sdata["transcripts"].compute()
    fk = "feature_name"
    he = np.moveaxis(_level0(sdata["he_image"]), 0, -1).astype(np.uint8)
    he_to_um = _affine_um(sdata, "he_image", ps)
    um_to_he = np.linalg.inv(he_to_um)
    is_gene = df[fk].astype(str).isin(genes).to_numpy()
    gx, gy = df["x"].to_numpy()[is_gene], df["y"].to_numpy()[is_gene]
    gcode = pd.Index(genes).get_indexer(df[fk].astype(str).to_numpy()[is_gene])

    if kind == "visium":
        from scipy.spatial import cKDTree

        u = float(gen["he_um_per_px"])
        spots = hex_lattice(w, h)
        hits = cKDTree(np.column_stack([gx, gy])).query_ball_point(
            spots[["x_um", "y_um"]].to_numpy(), VISIUM_SPOT_UM / 2
        )
        rows = np.repeat(np.arange(len(spots)), [len(v) for v in hits])
        cols = gcode[np.concatenate([np.asarray(v, np.int64) for v in hits])]
        counts = np.zeros((len(spots), len(genes)), np.int64)
        np.add.at(counts, (rows, cols), 1)
        pxy = um_to_he @ np.vstack([spots["x_um"], spots["y_um"], np.ones(len(spots))])
        spots["pxl_col"], spots["pxl_row"] = pxy[0], pxy[1]
        spots["in_tissue"] = counts.sum(axis=1) > 0
        spots["barcode"] = barcodes(len(spots), salt=seed)
        fullres = write_visium(
            path,
            counts=counts,
            genes=genes,
            array_row=spots["array_row"],
            array_col=spots["array_col"],
            pxl_row=spots["pxl_row"],
            pxl_col=spots["pxl_col"],
            image_rgb=he,
            um_per_px=u,
            barcodes_=spots["barcode"],
            in_tissue=spots["in_tissue"],
            **kwargs,
        )
        library_id = kwargs.get("library_id")
        return Folder(
            "visium",
            path,
            dataset_id=None if library_id else "vis",
            fullres_image=fullres,
            um_per_px=u,
            genes=genes,
            truth={"spots": spots, "counts": counts, "he_to_um": he_to_um, "size_um": (w, h)},
        )

    if kind == "visium_hd":
        u = float(gen["he_um_per_px"])
        n_rows, n_cols = int(h // 2), int(w // 2)
        r = np.floor(gy / 2).astype(np.int64)
        c = np.floor(gx / 2).astype(np.int64)
        ok = (r >= 0) & (r < n_rows) & (c >= 0) & (c < n_cols)
        counts = np.zeros((n_rows, n_cols, len(genes)), np.int32)
        np.add.at(counts, (r[ok], c[ok], gcode[ok]), 1)
        if abs(he_to_um[0, 1]) > 1e-9 or abs(he_to_um[1, 0]) > 1e-9:
            raise ValueError("Visium HD bins need an axis-aligned H&E")
        origin = um_to_he @ np.array([0.0, 0.0, 1.0])
        # cells: synthetic boundaries (µm) in full-resolution pixels, counts from the synthetic table
        cb = sdata["cell_boundaries"]
        table = sdata["table"]
        order = table.obs["cell_id"].astype(str).to_numpy()
        rings = []
        for geom in cb.geometry.loc[order]:
            xy = np.asarray(geom.exterior.coords)  # µm (the element's Scale(1 / ps) maps them to global)
            rings.append((um_to_he @ np.column_stack([xy, np.ones(len(xy))]).T)[:2].T)
        cells = HDCells(rings, sp.csr_matrix(table[:, genes].X).astype(np.int64))
        fullres = write_visium_hd(
            path,
            counts=counts,
            genes=genes,
            image_rgb=he,
            um_per_px=u,
            origin_px=(float(origin[0]), float(origin[1])),
            cells=cells,
            **kwargs,
        )
        prefix = kwargs.get("prefix", "")
        return Folder(
            "visium_hd",
            path,
            dataset_id=None if prefix else "hd",
            fullres_image=fullres,
            um_per_px=u,
            genes=genes,
            truth={"counts": counts, "origin_px": (float(origin[0]), float(origin[1])), "he_to_um": he_to_um},
        )

    if kind == "xenium":
        dapi = _level0(sdata["morphology_focus"])[0]
        cb = sdata["cell_boundaries"]
        nb = sdata["nucleus_boundaries"]
        ids = cb.index.astype(str).to_numpy()
        cell_of_nucleus = pd.Index(ids).get_indexer(nb["cell_id"].astype(str).to_numpy())
        cells = XeniumCells(
            [np.asarray(g.exterior.coords) for g in cb.geometry],
            [np.asarray(g.exterior.coords) for g in nb.geometry],
            nucleus_cell=cell_of_nucleus,
            ids=list(ids),
        )
        tx = pd.DataFrame(
            {
                "x_location": df["x"].to_numpy().astype(np.float32),
                "y_location": df["y"].to_numpy().astype(np.float32),
                "z_location": df["z"].to_numpy().astype(np.float32),
                "feature_name": df[fk].astype(str).to_numpy(),
                "qv": df["qv"].to_numpy().astype(np.float32),
            }
        )
        he_to_global = np.diag([1 / ps, 1 / ps, 1.0]) @ he_to_um
        write_xenium(
            path,
            transcripts=tx,
            morphology=dapi,
            pixel_size=ps,
            cells=cells,
            he_image=he,
            he_to_morphology=he_to_global,
            seed=seed,
            **kwargs,
        )
        return Folder(
            "xenium",
            path,
            um_per_px=ps,
            genes=genes,
            truth={
                "transcripts": tx,
                "he_to_global": he_to_global,
                "n_cells": len(ids),
                "size_um": (w, h),
                "stains": list(XENIUM_STAINS) if kwargs.get("stains") == "multimodal" else ["DAPI"],
            },
        )

    msg = f"kind={kind!r}: use 'visium', 'visium_hd' or 'xenium'"
    raise ValueError(msg)
