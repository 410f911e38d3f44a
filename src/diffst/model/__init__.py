"""diffst.model: the Diff-ST network and diffusion in pure torch (no SpatialData, no Lightning).

>>> from diffst.model import DiffSTConfig, DiffSTNet, Diffusion
>>> config = DiffSTConfig.preset("default", n_genes=25)
>>> net, diffusion = DiffSTNet(config, coexpr=coexpr), Diffusion(config)
>>> losses = diffusion.training_losses(net, x0, lr, mask, image, progress=0.3)
>>> sr = diffusion.sample(net, lr, mask, image, sampler="dpmsolver", steps=20)
"""

from .cam import ConcatFusion, DisentangledFusion, disentangling_loss
from .config import DiffSTConfig
from .diffusion import Diffusion, Sampler
from .floor import fit_stain_exponents, floor_model_units, hr_signal, image_floor, nuclear_signal, stain_signals
from .graph import CIGCGraph, coexpression_intensity, normalize_coexpression
from .image_encoder import HierarchicalImageEncoder, patch_entropy
from .network import DiffSTNet, DiffSTOutput
from .unet import UNet
from .upsample import fill_unobserved, upsample_lr

__all__ = [
    "CIGCGraph",
    "ConcatFusion",
    "DiffSTConfig",
    "DiffSTNet",
    "DiffSTOutput",
    "Diffusion",
    "DisentangledFusion",
    "HierarchicalImageEncoder",
    "Sampler",
    "UNet",
    "coexpression_intensity",
    "disentangling_loss",
    "fill_unobserved",
    "fit_stain_exponents",
    "floor_model_units",
    "hr_signal",
    "image_floor",
    "normalize_coexpression",
    "nuclear_signal",
    "patch_entropy",
    "stain_signals",
    "upsample_lr",
]
