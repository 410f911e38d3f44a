"""The Lightning side of training: the module (objective, EMA, validation) and a history callback."""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch

from ..model import DiffSTConfig, DiffSTNet, Diffusion, weak
from ..model.diffusion import dihedral, undihedral
from ..model.floor import floor_model_units
from ..model.upsample import upsample_lr

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

VAL_SEED = 12345  # validation noise and timesteps are the same every epoch, so val_loss is comparable


def pearson_per_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson r of each ``(sample, gene)`` map over pixels; maps without variance give NaN."""
    a = a.flatten(2).double()
    b = b.flatten(2).double()
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    den = (a.square().sum(-1) * b.square().sum(-1)).sqrt()
    return torch.where(den > 0, (a * b).sum(-1) / den.clamp_min(1e-30), torch.full_like(den, float("nan")))


def rmse_per_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RMSE of each ``(sample, gene)`` map over pixels."""
    return (a.flatten(2).double() - b.flatten(2).double()).square().mean(-1).sqrt()


class DiffSTModule(L.LightningModule):
    """Diff-ST training: AdamW on the denoising objective, an EMA copy for sampling, validation loss and PCC.

    Parameters
    ----------
    config
        :meth:`DiffSTConfig.to_dict` output.
    coexpr
        ``(G, G)`` co-expression intensity.
    val_steps
        Fast-sampler steps for the validation PCC of the ``"diffusion"`` objective (the others validate their mean
        head, one network call).
    augment
        Random rotations/flips of training windows.
    gene_scale
        Per-gene scale of the model units (needed by the image-floor base, and to score the image floor on the
        validation windows beside bicubic); ``None`` skips the floor's score.
    fingerprint
        The prepared data's fingerprint, kept in the checkpoint so that a resumed run can check it continues on the
        same data.

    """

    def __init__(
        self,
        config: dict[str, Any],
        coexpr: list[list[float]],
        val_steps: int = 10,
        augment: bool = True,
        gene_scale: list[float] | None = None,
        fingerprint: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.config = DiffSTConfig.from_dict(config)
        self.net = DiffSTNet(self.config, coexpr=torch.tensor(np.asarray(coexpr, dtype=np.float32)))
        #: The weight average used for validation and kept as the model; diffusers' ``EMAModel`` (:attr:`averager`)
        #: computes it and copies it here after every step, so it is saved with the module's weights.
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.averager: EMAModel | None = None
        self.diffusion = Diffusion(self.config, gene_scale=None if gene_scale is None else torch.tensor(gene_scale))
        self._val: dict[str, list[torch.Tensor]] = {}
        #: Windows of LR alone over all the tissue (with their degradation footprint), for ``config.lr_weight``.
        self.lr_windows: Any = None

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.AdamW(
            self.net.parameters(), lr=c.learning_rate, betas=c.adam_betas, eps=c.adam_eps, weight_decay=c.weight_decay
        )

    def _progress(self) -> float:
        total = self.trainer.estimated_stepping_batches if self.trainer is not None else 0
        if not total or not np.isfinite(total):
            return 1.0
        return float(min(1.0, self.global_step / max(1.0, float(total))))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.config.supervision == "lr":
            return self._weak_step(batch)
        if self.hparams.augment:
            ks = torch.randint(0, 8, (batch["x0"].shape[0],), device="cpu").tolist()
            batch = {k: _turn(v, ks) for k, v in batch.items()}
        losses = self.diffusion.training_losses(
            self.net, batch["x0"], batch["lr"], batch["mask"], batch["image"], progress=self._progress(),
            gene_scale=batch.get("gene_scale"), context=self._context(batch),
        )  # fmt: skip
        bs = batch["x0"].shape[0]
        loss = losses["loss"]
        if self.config.lr_weight > 0 and self.lr_windows is not None and len(self.lr_windows):
            lr_loss = self._lr_windows_loss(bs)
            loss = loss + self.config.lr_weight * lr_loss
            self.log("train_lr_loss", lr_loss, on_step=False, on_epoch=True, batch_size=bs)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        self.log("train_dis", losses["dis"], on_step=False, on_epoch=True, batch_size=bs)
        self.log("kept_fraction", losses["kept_fraction"].float(), on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def _weak_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hide a share of the spots, predict the HR map from the rest and the image, score it on the hidden ones.

        Rotations/flips apply to what the network sees; its map is turned back before the degradation, so the
        footprints stay in the frame they were read in.
        """
        mse, dis = self._hidden_spots_loss(batch)
        loss = mse + self.config.dis_weight * dis
        bs = batch["lr"].shape[0]
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        self.log("train_dis", dis, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def _hidden_spots_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The hide-and-predict loss of a batch (MSE on the hidden spots' counts) and its disentangling loss."""
        lr, mask, image = batch["lr"], batch["mask"], batch["image"]
        scale = self._scale(batch)
        hidden = weak.hide(mask, self.config.hide_fraction)
        lr_in, mask_in = weak.hidden_input(lr, mask, hidden)
        context = weak.hide_context(self._context(batch), mask_in)
        ks = torch.randint(0, 8, (lr.shape[0],)).tolist() if self.hparams.augment else [0] * lr.shape[0]

        def turn(x: torch.Tensor, fn=dihedral) -> torch.Tensor:
            return torch.stack([fn(x[i], k) for i, k in enumerate(ks)])

        pred, out = self.diffusion.mean_map(self.net, turn(lr_in), turn(mask_in), turn(image),
                                            progress=self._progress(), gene_scale=scale,
                                            context=None if context is None else turn(context))  # fmt: skip
        # bounded above as the sampler's clip is, so that early, wild outputs cannot overflow the counts
        pred = turn(pred, undihedral).clamp_max(self.config.x0_range[1] + 1.0)
        mse = weak.weak_loss(pred, lr, hidden, batch["foot"], batch["offset"], batch["area"], scale,
                             self.config.scale)  # fmt: skip
        return mse, out.dis_loss.float()

    def _lr_windows_loss(self, n: int) -> torch.Tensor:
        """The hide-and-predict loss on ``n`` windows drawn from :attr:`lr_windows` (LR only; see ``lr_weight``).

        Drawn with torch's global generator, which the run seeds at every step, so a resumed run draws the same ones.
        """
        idx = torch.randint(len(self.lr_windows), (n,)).tolist()
        items = [self.lr_windows[i] for i in idx]
        batch = {k: torch.stack([it[k] for it in items]).to(self.device) for k in items[0]}
        mse, _ = self._hidden_spots_loss(batch)
        return mse

    def _scale(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The windows' per-gene scales ``(B, G)`` (each slide's own normalisation), else the module's ``(G,)``."""
        scale = batch.get("gene_scale")
        if scale is not None:
            return scale
        return None if self.diffusion.gene_scale is None else self.diffusion.gene_scale.to(batch["lr"].device)

    def _context(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The windows' panel-context maps, for a network that reads them."""
        return batch["context"] if self.config.context_genes else None

    def on_train_start(self) -> None:
        # made here, after a resumed run's weights (the average among them) are loaded, on the module's device; its
        # step count is the optimiser's, so the warm-up continues where it was
        from diffusers.training_utils import EMAModel  # a second of imports, for training only

        self.averager = EMAModel(self.ema.parameters(), decay=self.config.ema_decay)
        self.averager.optimization_step = int(self.global_step)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # the average follows the step it averages (not on_train_batch_end, which runs after the callbacks'): a
        # checkpoint written by a callback at the end of a batch then holds the average of that batch
        self.averager.step(self.net.parameters())
        self.averager.copy_to(self.ema.parameters())
        with torch.no_grad():
            for b_ema, b in zip(self.ema.buffers(), self.net.buffers(), strict=True):
                b_ema.copy_(b)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_gen = torch.Generator(device="cpu").manual_seed(VAL_SEED)
        self._val = {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self.config.supervision == "lr":
            self._weak_validation(batch)
            return
        x0, lr, mask, image = batch["x0"], batch["lr"], batch["mask"], batch["image"]
        gene_scale, context = self._scale(batch), self._context(batch)
        losses = self.diffusion.training_losses(self.ema, x0, lr, mask, image, progress=1.0, generator=self._val_gen,
                                                gene_scale=gene_scale, context=context)  # fmt: skip
        self.log("val_loss", losses["mse"], prog_bar=False, on_epoch=True, batch_size=x0.shape[0], sync_dist=True)
        # the map users get: the mean head (one call), or a fast sample for the paper's objective
        pred = self.diffusion.predict_mean(self.ema, lr, mask, image, gene_scale=gene_scale, context=context)
        if pred is None:
            pred = self.diffusion.sample(
                self.ema, lr, mask, image, sampler="ddim", steps=self.hparams.val_steps, generator=self._val_gen,
                gene_scale=gene_scale, context=context,
            )  # fmt: skip
        maps = {"": pred, "_bicubic": upsample_lr(lr, mask, self.config.scale)}
        c = self.config
        if gene_scale is not None:
            maps["_floor"] = floor_model_units(
                lr, mask, image, scale=c.scale, per_hr=c.image_per_hr, gene_scale=gene_scale.to(lr),
                kind=c.image_kind, channel=c.nuclear_channel,
            )  # fmt: skip
        for name, m in maps.items():
            self._val.setdefault(f"val_pcc{name}", []).append(pearson_per_map(m, x0).cpu())
            self._val.setdefault(f"val_rmse{name}", []).append(rmse_per_map(m, x0).cpu())

    def _weak_validation(self, batch: dict[str, torch.Tensor]) -> None:
        """Held-out spots: each spot predicted from the image and the other spots (:func:`diffst.model.weak.leave_out`).

        The model, bicubic and the image floor each predict every validation spot while it is hidden; their maps,
        degraded, are compared with the spots' counts (per gene over all validation spots, at the epoch's end).
        """
        lr, mask, image = batch["lr"], batch["mask"], batch["image"]
        foot, offset, area = batch["foot"], batch["offset"], batch["area"]
        scale, gene_scale, context = self.config.scale, self._scale(batch), self._context(batch)
        group = weak.hide(torch.ones_like(mask), 0.5, generator=self._val_gen)
        hidden = group & (mask > 0)
        lr_in, mask_in = weak.hidden_input(lr, mask, hidden)
        pred = self.diffusion.predict_mean(self.ema, lr_in, mask_in, image, gene_scale=gene_scale,
                                           context=weak.hide_context(context, mask_in))  # fmt: skip
        loss = weak.weak_loss(pred, lr, hidden, foot, offset, area, gene_scale, scale)
        self.log("val_loss", loss, on_epoch=True, batch_size=lr.shape[0], sync_dist=True)
        for name, fn in weak.predictors(self.diffusion, self.ema, image, gene_scale, context).items():
            pair = weak.heldout(fn, lr, mask, foot, offset, area, gene_scale, scale, group)
            self._val.setdefault(f"pairs{name}", []).append(torch.stack(pair).cpu())

    def on_validation_epoch_end(self) -> None:
        for name in [k for k in self._val if k.startswith("pairs")]:
            pred, truth = torch.cat(self._val.pop(name), dim=2)  # (G, spots) each
            suffix = name.removeprefix("pairs")
            self._val[f"val_pcc{suffix}"] = [pearson_per_map(pred[None, :, :, None], truth[None, :, :, None])]
            self._val[f"val_rmse{suffix}"] = [rmse_per_map(pred[None, :, :, None], truth[None, :, :, None])]
        for name, parts in self._val.items():
            value = torch.nanmean(torch.cat(parts).flatten())
            self.log(name, value.float(), prog_bar=name in ("val_pcc", "val_rmse"), sync_dist=True)


def _turn(v: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Each window's maps ``(B, C, H, W)`` turned by its own dihedral index; per-window vectors stay as they are."""
    if v.ndim < 4:
        return v
    return torch.stack([dihedral(v[i], k) for i, k in enumerate(ks)])


class History(L.Callback):
    """Collect per-epoch metrics (``train_loss``, ``val_loss``, ``val_pcc`` …) in a list of dicts."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._t0: float | None = None
        self._offset = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a resumed run continues the clock of the run it resumes
        self._t0 = time.perf_counter()
        self._offset = self.rows[-1].get("seconds", 0.0) if self.rows else 0.0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        row = {"epoch": int(trainer.current_epoch), "step": int(trainer.global_step)}
        if self._t0 is not None:
            row["seconds"] = self._offset + time.perf_counter() - self._t0
        for k, v in trainer.callback_metrics.items():
            if k.endswith("_step"):
                continue
            row[k.removesuffix("_epoch")] = float(v)
        self.rows.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))
