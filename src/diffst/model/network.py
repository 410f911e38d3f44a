"""DiffSTNet: the full conditional denoiser of Diff-ST (paper Fig. 2, Eq. 2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cam import ConcatFusion, DisentangledFusion
from .config import DiffSTConfig
from .graph import CIGCGraph
from .image_encoder import HierarchicalImageEncoder
from .layers import group_norm
from .unet import UNet
from .upsample import upsample_lr

__all__ = ["DiffSTNet", "DiffSTOutput"]


@dataclass
class DiffSTOutput:
    """Output of :class:`DiffSTNet`.

    Attributes
    ----------
    sample
        ``(B, G, H, W)`` model output for the configured prediction type (ε, v or the clean sample).
    dis_loss
        Scalar disentangling loss L_dis (0 when ``cam=False``).
    kept_fraction
        Share of cell-level patches kept by the curriculum (0 when ``hierarchical=False``), for logging.

    """

    sample: Tensor
    dis_loss: Tensor
    kept_fraction: float


class DiffSTNet(nn.Module):
    """The Diff-ST denoiser ``μ_θ(x_t, y, h, t)`` of paper Eq. 2 (Fig. 2), parameterised by its output type.

    1. Image ``h`` -> hierarchical cell-to-tissue features F_h (:class:`HierarchicalImageEncoder`).
    2. LR maps ``y`` -> mask-aware up-sampling ``up(y)`` (:func:`upsample_lr`) and ST features
       ``F_y = conv(concat(up(y), up(mask)))``.
    3. ``F_y, F_h`` -> condition by CAM + disentangling (:class:`DisentangledFusion`, returns L_dis)
       or by concatenation when ``cam=False``.
    4. Noisy maps ``x_t`` -> co-expression context (:class:`CIGCGraph`) unless ``cigc_graph=False``.
    5. UNet on ``concat(x_t, graph context, up(y), up(mask), condition)`` -> ``G`` output maps.

    Parameters
    ----------
    config
        Sizes and switches.
    coexpr
        ``(G, G)`` co-expression intensity ``I`` (:func:`~diffst.model.coexpression_intensity`), stored
        as the buffer ``graph.coexpr``. ``None`` (or ``cigc_graph=False``) means no co-expression prior.

    """

    def __init__(self, config: DiffSTConfig, coexpr: Tensor | None = None):
        super().__init__()
        self.config = config
        g, cond = config.n_genes, config.cond_channels
        self.image_encoder = HierarchicalImageEncoder(config)
        self.st_encoder = nn.Sequential(
            nn.Conv2d(g + 1 + config.context_genes, cond, 3, padding=1),
            group_norm(cond),
            nn.SiLU(),
            nn.Conv2d(cond, cond, 3, padding=1),
        )
        if config.cam:
            self.fusion = DisentangledFusion(cond, config.d_tissue, config.cam_dim, config.cam_window, cond)
        else:
            self.fusion = ConcatFusion(cond, config.d_tissue, cond)
        self.graph = (
            CIGCGraph(g, config.graph_grid, config.graph_node_channels, config.graph_alpha, coexpr)
            if config.cigc_graph
            else None
        )
        x_channels = 2 * g if config.cigc_graph else g
        self.unet = UNet(
            x_channels + g + 1 + cond,
            g,
            config.base_channels,
            config.channel_mult,
            config.num_res_blocks,
            config.attention,
            config.dropout,
        )

    def forward(
        self,
        x_t: Tensor,
        t: Tensor | int,
        lr: Tensor,
        mask: Tensor,
        image: Tensor,
        *,
        progress: float = 1.0,
        base: Tensor | None = None,
        context: Tensor | None = None,
    ) -> DiffSTOutput:
        """Predict the diffusion target for noisy HR maps.

        Parameters
        ----------
        x_t
            ``(B, G, H, W)`` noisy HR maps (of the residual ``x0 - up(lr)`` when ``config.residual``).
        t
            ``(B,)`` integer timesteps in ``[0, num_train_timesteps)`` (or one for the whole batch).
        lr
            ``(B, G, h, w)`` normalised LR maps with ``H = scale * h``.
        mask
            ``(B, 1, h, w)`` observed fraction of each LR pixel.
        image
            ``(B, C_img, H * hr_um / image_um, ...)`` tile image in [0, 1].
        progress
            Training progress in [0, 1] for the cell-patch curriculum; 1.0 at inference.
        base
            ``(B, G, H, W)`` HR map that stands for ``up(lr)`` in the network's inputs (the image floor when the
            config's ``base`` is ``"floor"``); ``None`` uses the bicubic ``up(lr)``.
        context
            ``(B, K, h, w)`` LR maps of the panel-context genes (normalised like ``lr``), when the config has
            ``context_genes = K``; read by the ST branch beside ``lr``.

        Returns
        -------
        :class:`DiffSTOutput` with the prediction, L_dis and the kept share of cell patches.

        """
        self._check_inputs(x_t, lr, mask, image, context)
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        up_lr = upsample_lr(lr, mask, self.config.scale) if base is None else base
        up_mask = F.interpolate(mask, scale_factor=self.config.scale, mode="nearest")

        f_h, kept_fraction = self.image_encoder(image, progress)
        st = [up_lr, up_mask] + ([upsample_lr(context, mask, self.config.scale)] if self.config.context_genes else [])
        f_y = self.st_encoder(torch.cat(st, dim=1))
        cond, dis_loss = self.fusion(f_y, f_h)

        x_in = [x_t, self._graph_context(x_t)] if self.graph is not None else [x_t]
        out = self.unet(torch.cat([*x_in, up_lr, up_mask, cond], dim=1), t)
        return DiffSTOutput(sample=out, dis_loss=dis_loss, kept_fraction=kept_fraction)

    def _graph_context(self, x_t: Tensor) -> Tensor:
        """The CIGC-Graph's context of ``x_t``; an empty ``x_t`` (the mean head's zeros) has one context for all."""
        if x_t.shape[0] > 1 and not bool(x_t.any()):
            return self.graph(x_t[:1]).expand_as(x_t)
        return self.graph(x_t)

    def _check_inputs(self, x_t: Tensor, lr: Tensor, mask: Tensor, image: Tensor, context: Tensor | None) -> None:
        cfg = self.config
        b, g, h, w = x_t.shape
        problems = []
        k = cfg.context_genes
        if k and (context is None or context.shape != (b, k, *lr.shape[-2:])):
            got = "none" if context is None else f"shape {tuple(context.shape)}"
            problems.append(f"context: expected {k} panel-context maps {(b, k, *lr.shape[-2:])}, got {got}")
        if g != cfg.n_genes:
            problems.append(f"x_t has {g} gene channels, the model {cfg.n_genes}")
        if lr.shape != (b, g, h // cfg.scale, w // cfg.scale) or h % cfg.scale or w % cfg.scale:
            problems.append(f"lr has shape {tuple(lr.shape)}, expected {(b, g, h // cfg.scale, w // cfg.scale)}")
        if mask.shape != (b, 1, *lr.shape[-2:]):
            problems.append(f"mask has shape {tuple(mask.shape)}, expected {(b, 1, *lr.shape[-2:])}")
        expected = (b, cfg.image_channels + cfg.feature_channels, h * cfg.image_per_hr, w * cfg.image_per_hr)
        if image.shape != expected:
            feats = f" and {cfg.feature_channels} {cfg.image_encoder} feature maps" if cfg.feature_channels else ""
            problems.append(
                f"image has shape {tuple(image.shape)}, expected {expected} "
                f"({cfg.image_channels} channels{feats} at image_um={cfg.image_um} µm/px)"
            )
        if problems:
            msg = "DiffSTNet inputs do not match the config: " + "; ".join(problems) + "."
            raise ValueError(msg)
