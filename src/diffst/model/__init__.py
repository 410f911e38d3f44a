"""diffst.model: the Diff-ST network and diffusion in pure torch (no SpatialData, no Lightning).

>>> from diffst.model import DiffSTConfig, DiffSTNet, Diffusion
>>> config = DiffSTConfig.preset("default", n_genes=25)
>>> net, diffusion = DiffSTNet(config, coexpr=coexpr), Diffusion(config)
>>> losses = diffusion.training_losses(net, x0, lr, mask, image, progress=0.3)
>>> sr = diffusion.sample(net, lr, mask, image, sampler="dpmsolver", steps=20)
"""

from .config import DiffSTConfig
from .diffusion import Diffusion, Sampler
from .graph import coexpression_intensity, normalize_coexpression
from .image_encoder import patch_entropy
from .network import DiffSTNet, DiffSTOutput
from .upsample import upsample_lr

__all__ = [
    "DiffSTConfig",
    "DiffSTNet",
    "DiffSTOutput",
    "Diffusion",
    "Sampler",
    "coexpression_intensity",
    "normalize_coexpression",
    "patch_entropy",
    "upsample_lr",
]
