"""Diffusion for Diff-ST: the training objective and the samplers (paper Eq. 1-2), over diffusers schedulers."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import DiffSTConfig
from .floor import floor_model_units
from .upsample import upsample_lr

__all__ = ["Diffusion", "Sampler", "dihedral", "undihedral"]

Sampler = Literal["ddpm", "ddim", "dpmsolver"]


def dihedral(x: Tensor, k: int) -> Tensor:
    """One of the 8 rotations/flips of the last two axes (``k`` in 0..7)."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def undihedral(x: Tensor, k: int) -> Tensor:
    """The inverse of :func:`dihedral`: ``undihedral(dihedral(x, k), k) == x``."""
    x = torch.rot90(x, -(k % 4), dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    # draw on the generator's device (a CPU generator gives the same numbers on any accelerator)
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


class Diffusion:
    """Conditional DDPM of paper Eq. 1-2 on (residual) HR gene maps; model-free, wraps diffusers schedulers.

    Forward process (Eq. 1): ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε`` with the ``beta_schedule`` of the
    config (``DDPMScheduler.add_noise``). With ``config.residual`` the diffused variable is the residual
    ``x_0 - up(y)`` over the mask-aware bicubic up-sampling of the LR maps (SR3/SRDiff): the network only
    has to add the detail that up-sampling misses, and ``up(y)`` is added back after sampling.

    The network predicts ``config.prediction_type``: ``"epsilon"`` (the paper, following DDPM),
    ``"v_prediction"`` or ``"sample"`` (the clean residual). ``"sample"`` is the default of the
    ``default``/``tiny`` presets: combined with the residual and the zero-initialised output layer the
    untrained model already returns the bicubic baseline, and in short CPU trainings it reaches a lower
    x0 error than ε-prediction (whose x0 estimate at large t divides the ε error by ``sqrt(ᾱ_t)``).

    Reverse process (Eq. 2): 1000-step ancestral DDPM (paper fidelity), DDIM (η = 0) or DPM-Solver++
    (2nd order multistep, the fast default), all built from the same betas. Each step converts the model
    output to an x0 estimate, clips ``up(y) + x0`` to ``config.x0_range`` and hands the scheduler the
    clipped estimate (as ``prediction_type="sample"``), so every sampler sees the same clipping.

    Parameters
    ----------
    config
        The model config (diffusion fields: ``num_train_timesteps``, ``beta_*``, ``prediction_type``,
        ``residual``, ``x0_range``, ``sampler``, ``sample_steps``, ``dis_weight``).
    gene_scale
        Per-gene scale ``s_g`` of the model units ``2·log1p(c)/s_g − 1`` that the floor bases need to work in
        counts: ``(G,)`` for every window. Methods that take a ``gene_scale`` argument use it instead: ``(G,)`` or
        one row per window ``(B, G)`` (windows of several slides, each normalised by its own scales).

    """

    def __init__(self, config: DiffSTConfig, gene_scale: Tensor | None = None):
        self.config = config
        #: Per-gene scale of the model units (needed by the ``"floor"`` base to work in counts).
        self.gene_scale = None if gene_scale is None else torch.as_tensor(gene_scale, dtype=torch.float32)
        self._betas = {
            "num_train_timesteps": config.num_train_timesteps,
            "beta_start": config.beta_start,
            "beta_end": config.beta_end,
            "beta_schedule": config.beta_schedule,
        }
        self.scheduler = DDPMScheduler(**self._betas, prediction_type=config.prediction_type, clip_sample=False)

    @property
    def alphas_cumprod(self) -> Tensor:
        """``ᾱ_t`` for ``t = 0 .. T-1`` (``ᾱ_0 = 1 - β_1``)."""
        return self.scheduler.alphas_cumprod

    def scale_of(self, gene_scale: Tensor | None) -> Tensor | None:
        """The per-gene scale a call uses: its own ``(G,)`` or ``(B, G)``, else the one given at construction."""
        return self.gene_scale if gene_scale is None else torch.as_tensor(gene_scale, dtype=torch.float32)

    def condition(self, lr: Tensor, mask: Tensor, image: Tensor | None = None, *,
                  gene_scale: Tensor | None = None) -> Tensor:  # fmt: skip
        """The base map in model units.

        The image floor (``base="floor"``), the fitted floor (``"fitted"``, see
        :func:`~diffst.model.fit_stain_exponents`) or ``up(y)`` (``"bicubic"``).
        """
        c = self.config
        if c.base == "bicubic":
            return upsample_lr(lr, mask, c.scale)
        scale = self.scale_of(gene_scale)
        if image is None or scale is None:
            msg = "The 'floor' base needs the image and the per-gene scale (Diffusion(config, gene_scale=...))."
            raise ValueError(msg)
        return floor_model_units(
            lr, mask, image, scale=c.scale, per_hr=c.image_per_hr, gene_scale=scale.to(lr.device),
            kind=c.image_kind, channel=c.nuclear_channel, exponents=self.stain_exponents,
        ).to(lr.dtype)  # fmt: skip

    @property
    def stain_exponents(self) -> Tensor | None:
        """The fitted floor's per-gene stain exponents ``(G, K)`` (``base="fitted"``), else ``None`` (the floor)."""
        c = self.config
        if c.base != "fitted" or c.stain_exponents is None:
            return None
        return torch.as_tensor(c.stain_exponents, dtype=torch.float32)

    def baseline(self, lr: Tensor, mask: Tensor, image: Tensor | None = None, *,
                 gene_scale: Tensor | None = None) -> Tensor:  # fmt: skip
        """The HR baseline the residual is taken from (:meth:`condition`; zeros when ``residual=False``)."""
        return self._residual_base(self.condition(lr, mask, image, gene_scale=gene_scale))

    def _net(self, net: nn.Module, x: Tensor, t: Tensor, lr: Tensor, mask: Tensor, image: Tensor, *,
             progress: float, cond: Tensor | None, context: Tensor | None = None):  # fmt: skip
        extra = {} if context is None else {"context": context}
        # the network reads the floor in place of up(y) when that is the base
        if self.config.base == "bicubic":
            return net(x, t, lr, mask, image, progress=progress, **extra)
        return net(x, t, lr, mask, image, progress=progress, base=cond, **extra)

    # ------------------------------------------------------------------ training
    def training_losses(
        self,
        net: nn.Module,
        x0: Tensor,
        lr: Tensor,
        mask: Tensor,
        image: Tensor,
        *,
        progress: float = 1.0,
        generator: torch.Generator | None = None,
        gene_scale: Tensor | None = None,
        context: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The Diff-ST objective ``L = ||target - net(x_t, t, y, h)||² + dis_weight · L_dis`` on one batch.

        Parameters
        ----------
        net
            A :class:`~diffst.model.DiffSTNet` (or any module with its call signature and output).
        x0
            ``(B, G, H, W)`` normalised HR maps.
        lr, mask, image
            The conditions, as for :class:`~diffst.model.DiffSTNet`.
        progress
            Training progress in [0, 1] (epoch fraction) for the cell-patch curriculum.
        generator
            Source of the timesteps and noise; ``None`` uses torch's global generator (seeded by the trainer).
        gene_scale
            The windows' per-gene scales (``(G,)`` or ``(B, G)``), when not the one given at construction.
        context
            ``(B, K, h, w)`` panel-context LR maps for a network that reads them (``config.context_genes``).

        Returns
        -------
        ``{"loss": total, "mse": denoising MSE, "dis": L_dis, "kept_fraction": share of cell patches kept}``, and
        ``"mean_mse"`` (the mean head's MSE) for the ``"refiner"`` and ``"regression"`` objectives.

        """
        b = x0.shape[0]
        cond = self.condition(lr, mask, image, gene_scale=gene_scale)
        target_x0 = x0 - self._residual_base(cond)
        terms: dict[str, Tensor] = {}
        if self.config.objective in ("regression", "refiner"):
            # the mean head: same inputs with an empty x_t at the mean timestep, trained to output x0 directly
            out = self._mean_output(net, lr, mask, image, x0, progress=progress, cond=cond, context=context)
            terms["mean_mse"] = F.mse_loss(out.sample.float(), target_x0.float())
            if self.config.objective == "regression":
                dis = out.dis_loss.float()
                return {
                    "loss": terms["mean_mse"] + self.config.dis_weight * dis,
                    "mse": terms["mean_mse"],
                    "mean_mse": terms["mean_mse"],
                    "dis": dis,
                    "kept_fraction": torch.tensor(out.kept_fraction),
                }
            # the refiner diffuses what the mean head leaves (its gradient does not flow into the mean)
            target_x0 = target_x0 - out.sample.detach()
        noise = _randn(tuple(x0.shape), generator, x0)
        t_device = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.config.num_train_timesteps, (b,), generator=generator, device=t_device)
        t = t.to(x0.device)
        x_t = self.scheduler.add_noise(target_x0, noise, t)
        out = self._net(net, x_t, t, lr, mask, image, progress=progress, cond=cond, context=context)
        if self.config.prediction_type == "epsilon":
            target = noise
        elif self.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(target_x0, noise, t)
        else:
            target = target_x0
        mse = F.mse_loss(out.sample.float(), target.float())
        dis = out.dis_loss.float()
        loss = mse + self.config.dis_weight * dis + terms.get("mean_mse", 0.0)
        return {"loss": loss, "mse": mse, "dis": dis, "kept_fraction": torch.tensor(out.kept_fraction), **terms}

    @property
    def mean_timestep(self) -> int:
        """The timestep index that asks the network for its mean head (one past the last diffusion step)."""
        return self.config.num_train_timesteps

    def _mean_output(self, net: nn.Module, lr: Tensor, mask: Tensor, image: Tensor, like: Tensor, *, progress: float,
                     cond: Tensor | None, context: Tensor | None = None):  # fmt: skip
        # the refiner asks for its mean head one past the last diffusion step; the regression network, which has
        # nothing else to be asked, is queried at t = 0
        t = 0 if self.config.objective == "regression" else self.mean_timestep
        t = torch.full((like.shape[0],), t, dtype=torch.long, device=like.device)
        return self._net(net, torch.zeros_like(like), t, lr, mask, image, progress=progress, cond=cond,
                         context=context)  # fmt: skip

    def mean_map(self, net: nn.Module, lr: Tensor, mask: Tensor, image: Tensor, *, progress: float = 1.0,
                 gene_scale: Tensor | None = None, context: Tensor | None = None):  # fmt: skip
        """The mean head's HR maps ``base + mean`` (not clipped, with gradients) and the network's output.

        What weak supervision (:mod:`diffst.model.weak`) trains; :meth:`predict_mean` is its inference form.
        """
        cond = self.condition(lr, mask, image, gene_scale=gene_scale)
        base = self._residual_base(cond)
        out = self._mean_output(net, lr, mask, image, base, progress=progress, cond=cond, context=context)
        return out.sample + base, out

    @torch.no_grad()
    def predict_mean(self, net: nn.Module, lr: Tensor, mask: Tensor, image: Tensor, *, average_flips: bool = False,
                     max_batch: int | None = None, gene_scale: Tensor | None = None,
                     context: Tensor | None = None) -> Tensor | None:  # fmt: skip
        """The mean head's HR maps ``up(y) + mean`` (clipped to ``x0_range``), or ``None`` for ``"diffusion"``.

        ``average_flips``: the average of the head over the 8 rotations/flips of the (square) windows, each map turned
        back first. Training shows the network every window in all 8 orientations, so each is an equally valid
        prediction; their average is exactly equivariant to them and cancels the orientation-specific part of the
        error (test-time augmentation; 8 times the work). The turned copies go through the network together, as
        many per call as keep a call within ``max_batch`` windows (at least one; all 8 when ``None``).
        """
        if self.config.objective == "diffusion":
            return None
        cond = self.condition(lr, mask, image, gene_scale=gene_scale)
        if not average_flips:
            return self._predict_mean(net, lr, mask, image, cond, context)
        # the base is made of flip-symmetric operations (bicubic, average pooling, per-pixel stains), so the
        # turned windows' base is the turned base: computed once
        per_call = 8 if max_batch is None else min(8, max(1, max_batch // len(lr)))
        total = torch.zeros(())
        for first in range(0, 8, per_call):
            turns = range(first, min(8, first + per_call))
            parts = (lr, mask, image, cond) if context is None else (lr, mask, image, cond, context)
            turned = [torch.cat([dihedral(x, k) for k in turns]) for x in parts]
            out = self._predict_mean(net, *turned)
            for k, part in zip(turns, out.chunk(len(turns)), strict=True):
                total = total + undihedral(part, k)
        return total / 8

    def _residual_base(self, cond: Tensor) -> Tensor:
        return cond if self.config.residual else torch.zeros_like(cond)

    def _predict_mean(self, net: nn.Module, lr: Tensor, mask: Tensor, image: Tensor, cond: Tensor,
                      context: Tensor | None = None) -> Tensor:  # fmt: skip
        base = self._residual_base(cond)
        out = self._mean_output(net, lr, mask, image, base, progress=1.0, cond=cond, context=context).sample
        lo, hi = self.config.x0_range
        return (out + base).clamp(lo, hi)

    # ------------------------------------------------------------------ sampling
    def predict_x0(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Convert the network output at timesteps ``t`` ``(B,)`` to an estimate of the (residual) x0."""
        if self.config.prediction_type == "sample":
            return model_output
        a = self.alphas_cumprod.to(x_t.device)[t].to(x_t.dtype).reshape(-1, 1, 1, 1)
        if self.config.prediction_type == "epsilon":
            return (x_t - (1 - a).sqrt() * model_output) / a.sqrt()
        return a.sqrt() * x_t - (1 - a).sqrt() * model_output  # v-prediction

    def make_scheduler(self, sampler: Sampler) -> DDPMScheduler | DDIMScheduler | DPMSolverMultistepScheduler:
        """A fresh sampling scheduler (same betas) that takes clipped x0 estimates (``prediction_type="sample"``)."""
        common = {**self._betas, "prediction_type": "sample"}
        if sampler == "ddpm":
            return DDPMScheduler(**common, clip_sample=False)
        if sampler == "ddim":
            # "trailing" spacing starts few-step sampling at t = T-1, where x_T really is pure noise
            return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
        if sampler == "dpmsolver":
            return DPMSolverMultistepScheduler(
                **common, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"
            )
        msg = f"Unknown sampler {sampler!r}; choose 'ddpm', 'ddim' or 'dpmsolver'."
        raise ValueError(msg)

    @torch.no_grad()
    def sample(
        self,
        net: nn.Module,
        lr: Tensor,
        mask: Tensor,
        image: Tensor,
        *,
        sampler: Sampler | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        mean: Tensor | None = None,
        progress_bar: bool = False,
        gene_scale: Tensor | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """Draw HR gene maps given the LR maps and the image (reverse process, paper Eq. 2).

        Parameters
        ----------
        net
            The trained network (put it in ``eval()`` mode, e.g. the EMA copy).
        lr, mask, image
            ``(B, G, h, w)``, ``(B, 1, h, w)``, ``(B, C_img, H_img, W_img)`` conditions.
        sampler
            ``"ddpm"`` (ancestral), ``"ddim"`` (η = 0) or ``"dpmsolver"`` (DPM-Solver++);
            ``None`` uses ``config.sampler``.
        steps
            Number of denoising steps; ``None`` uses ``config.sample_steps``, or all training steps for ``"ddpm"``.
        generator
            Source of the initial noise (and of DDPM's per-step noise): same generator state, same samples.
        noise
            The initial noise ``x_T`` ``(B, G, H, W)`` (standard normal), instead of drawing it from ``generator``;
            lets each tile of a slide have its own seed whatever batch it is sampled in (DDIM and DPM-Solver++ are
            deterministic given ``x_T``).
        mean
            For the ``"refiner"`` objective, the mean head ``(B, G, H, W)`` the samples scatter around, when the
            caller has it already (e.g. averaged over flips by :meth:`predict_mean`); ``None`` computes the plain
            head. Ignored by the other objectives.
        progress_bar
            Show a tqdm bar over the steps.
        gene_scale
            The windows' per-gene scales (``(G,)`` or ``(B, G)``), when not the one given at construction.
        context
            ``(B, K, h, w)`` panel-context LR maps for a network that reads them (``config.context_genes``).

        Returns
        -------
        ``(B, G, scale h, scale w)`` x0 estimate in normalised units.

        """
        if self.config.objective == "regression":
            return self.predict_mean(net, lr, mask, image, gene_scale=gene_scale, context=context)
        sampler = sampler or self.config.sampler
        if steps is None:
            steps = self.config.num_train_timesteps if sampler == "ddpm" else self.config.sample_steps
        scheduler = self.make_scheduler(sampler)
        scheduler.set_timesteps(steps, device=lr.device)
        cond = self.condition(lr, mask, image, gene_scale=gene_scale)
        base = self._residual_base(cond)
        if self.config.objective == "refiner":
            # samples are the mean head plus a diffused residual around it
            if mean is None:
                base = self._predict_mean(net, lr, mask, image, cond, context)
            elif mean.shape != base.shape:
                msg = f"mean has shape {tuple(mean.shape)}, expected {tuple(base.shape)}."
                raise ValueError(msg)
            else:
                base = mean.to(base)
        lo, hi = self.config.x0_range
        if noise is None:
            noise = _randn(tuple(base.shape), generator, base)
        elif noise.shape != base.shape:
            msg = f"noise has shape {tuple(noise.shape)}, expected {tuple(base.shape)}."
            raise ValueError(msg)
        x = noise.to(base) * scheduler.init_noise_sigma
        for t in tqdm(scheduler.timesteps, disable=not progress_bar, desc=f"{sampler} sampling"):
            t_batch = t.reshape(1).expand(x.shape[0])
            x_in = scheduler.scale_model_input(x, t)
            out = self._net(net, x_in, t_batch, lr, mask, image, progress=1.0, cond=cond, context=context).sample
            x0 = (self.predict_x0(out, x, t_batch) + base).clamp(lo, hi) - base
            x = scheduler.step(x0, t, x, generator=generator).prev_sample
        return x + base
