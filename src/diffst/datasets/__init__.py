"""Built-in datasets: seeded synthetic tissues in the layouts of spatialdata-io, and small public real datasets."""

from ._real import cosmx_lung, her2st, merfish_mouse_brain
from ._synthetic import synthetic_visium, synthetic_visium_hd, synthetic_xenium

__all__ = [
    "cosmx_lung",
    "her2st",
    "merfish_mouse_brain",
    "synthetic_visium",
    "synthetic_visium_hd",
    "synthetic_xenium",
]
