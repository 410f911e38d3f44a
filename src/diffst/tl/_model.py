"""``dst.DiffST``: a trained Diff-ST model with everything needed to apply it to data safely."""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..model import DiffSTConfig, DiffSTNet, Diffusion

if TYPE_CHECKING:
    from .._contract import Prepared

_FORMAT = "diffst-model/1"


@dataclass
class DiffST:
    """A trained Diff-ST model: network weights (the EMA average used for sampling) plus its data contract.

    Attributes
    ----------
    config
        The network and diffusion configuration (:class:`diffst.model.DiffSTConfig`).
    net
        The network (:class:`diffst.model.DiffSTNet`) holding the EMA weights.
    genes
        Gene names, in channel order.
    gene_scale
        Per-gene scale of the model units on the training data (log1p of the 99th percentile of HR counts).
    lr_scale
        The same statistic of the training data's LR counts per HR pixel; used to normalise another slide
        (``gene_scale · lr_scale_new / lr_scale``) when the model is transferred.
    units
        The units, image and measurement of the training data, a frozen record: ``hr_um``, ``lr_um``, ``scale``,
        ``image_um``, the image ``kind`` ("rgb" or "fluorescence") and ``channels``, the ``degradation`` (with
        ``spot_diameter_um`` and ``spot_pitch_um``), the ``measurement`` and the ``context_genes``.
    guard
        What validation decided: the per-gene blend with the image floor and the std calibration (a frozen record,
        ``Guard``: ``alpha``, ``std_scale``, ``std_noise``, the ``validation`` table …); ``None`` for a model not
        compared with the floor.
    history
        Per-epoch training metrics.
    info
        How it was trained (preset, seed, steps, time, checkpoint).
    path
        Where it was saved, if it was.

    """

    config: DiffSTConfig
    net: DiffSTNet
    genes: list[str]
    gene_scale: np.ndarray
    lr_scale: np.ndarray
    units: ModelUnits
    guard: Guard | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        self.net.eval()
        self.diffusion = self.diffusion_for()

    def diffusion_for(self, gene_scale: np.ndarray | None = None) -> Diffusion:
        """The diffusion process of this model in the per-gene units ``gene_scale`` of a slide (:meth:`gene_scale_for`).

        Without ``gene_scale``, in those of its training slide. Inference and the guard build theirs here.
        """
        scale = self.gene_scale if gene_scale is None else gene_scale
        return Diffusion(self.config, gene_scale=np.asarray(scale, dtype=np.float32))

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.net.parameters())
        where = f", saved at {self.path}" if self.path else ""
        return (
            f"DiffST({len(self.genes)} genes, {self.units.lr_um:g} → {self.units.hr_um:g} µm, "
            f"{self.units.kind} image at {self.config.image_um:g} µm/px, {n / 1e6:.2f} M parameters{where})"
        )

    @property
    def context_genes(self) -> list[str]:
        """The panel-context genes whose LR the model reads besides its genes' (empty for none)."""
        return list(self.units.context_genes)

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return next(self.net.parameters()).device

    def to(self, device: str | torch.device) -> DiffST:
        """Move the weights to a device (returns ``self``)."""
        self.net.to(device)
        return self

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Save weights, config, genes, normalisation and units to one file (``.pt``); returns the path."""
        path = Path(path)
        if path.suffix != ".pt":
            path = path / "model.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": _FORMAT,
            "config": self.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "genes": list(self.genes),
            "gene_scale": [float(v) for v in self.gene_scale],
            "lr_scale": [float(v) for v in self.lr_scale],
            "units": self.units.to_dict(),
            "guard": None if self.guard is None else self.guard.to_dict(),
            "history": copy.deepcopy(self.history),
            "info": copy.deepcopy(self.info),
        }
        tmp = path.with_suffix(".pt.tmp")
        torch.save(payload, tmp)
        tmp.replace(path)  # never leave a half-written model under the real name
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path, *, map_location: str | torch.device = "cpu") -> DiffST:
        """Load a model saved with :meth:`save` (a ``.pt`` file, or the folder holding ``model.pt``)."""
        path = Path(path)
        if path.is_dir():
            path = path / "model.pt"
        if not path.exists():
            msg = f"No diffst model at {path}."
            raise FileNotFoundError(msg)
        payload = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            msg = f"{path} is not a diffst model file (expected format {_FORMAT!r})."
            raise ValueError(msg)
        config = DiffSTConfig.from_dict(payload["config"])
        net = DiffSTNet(config)
        net.load_state_dict(payload["state_dict"])
        return cls(
            config=config,
            net=net,
            genes=list(payload["genes"]),
            gene_scale=np.asarray(payload["gene_scale"], dtype=np.float32),
            lr_scale=np.asarray(payload["lr_scale"], dtype=np.float32),
            units=ModelUnits.from_dict(payload["units"]),
            guard=None if payload["guard"] is None else Guard.from_dict(payload["guard"]),
            history=list(payload["history"]),
            info=dict(payload["info"]),
            path=path,
        )

    # ------------------------------------------------------------------ data contract
    def check_compatible(self, prep: Prepared, *, genes: list[str] | None = None) -> None:
        """Refuse data whose genes, units or image type differ from the training data (clear error)."""
        problems = []
        want = list(self.genes) if genes is None else list(genes)
        unknown = [g for g in want if g not in self.genes]
        if unknown:
            problems.append(f"the model does not know genes {unknown[:10]} (it was trained on {self.genes})")
        missing = [g for g in self.genes if g not in prep.genes]
        if missing:
            problems.append(
                f"the prepared data lack the model's genes {missing[:10]}; prepare it with `genes=model.genes`"
            )
        lacking = [g for g in self.context_genes if g not in prep.context_genes]
        if lacking:
            problems.append(
                f"the prepared data lack the panel-context genes {lacking[:10]} the model reads; prepare them with "
                "`context_genes=model.context_genes`"
            )
        if not np.isclose(prep.grid.hr_um, self.units.hr_um, rtol=1e-6) or prep.grid.scale != self.units.scale:
            problems.append(
                f"the data are prepared at {prep.grid.lr_um:g} → {prep.grid.hr_um:g} µm (scale {prep.grid.scale}), "
                f"the model was trained at {self.units.lr_um:g} → {self.units.hr_um:g} µm (scale {self.units.scale})"
            )
        if prep.image.kind != self.units.kind:
            why = prep.record.image.kind_reason
            problems.append(
                f"the data's image is {prep.image.kind}"
                + (f" ({why})" if why else "")
                + f", the model was trained on {self.units.kind} images; if the image is in fact "
                f"{self.units.kind}, prepare the data with `image_kind={self.units.kind!r}` (and `overwrite=True`)"
            )
        elif len(prep.image.channels) != self.config.image_channels:
            problems.append(
                f"the data's image has {len(prep.image.channels)} channels {list(prep.image.channels)}, the model "
                f"expects {self.config.image_channels} ({list(self.units.channels)})"
            )
        if problems:
            msg = "This model cannot be applied to these data: " + "; ".join(problems) + "."
            raise ValueError(msg)
        mismatch = self.degradation_mismatch(prep)
        if mismatch:
            warnings.warn(mismatch, UserWarning, stacklevel=3)

    def degradation_mismatch(self, prep: Prepared) -> str | None:
        """A warning when the data's LR arises from HR differently than in training (bins vs spot discs, spot size).

        The model learned to invert its training data's degradation; applied to another one (a model trained on
        binned transcripts applied to Visium spots), its maps are not what it was validated on.
        """
        d = prep.record.degradation
        trained, here = self.units.degradation, d.name

        def describe(name: str, diameter: float | None, pitch: float | None) -> str:
            if name == "bin":
                return "square bins (degradation='bin')"
            size = f"{diameter:g} µm spot discs" if diameter else "spot discs"
            return size + (f" {pitch:g} µm apart" if pitch else "") + f" ({name})"

        spots = {"visium", "spots"}
        mine = describe(trained, self.units.spot_diameter_um, self.units.spot_pitch_um)
        theirs = describe(here, d.spot_diameter_um, d.spot_pitch_um)
        if (trained == "bin") != (here == "bin"):
            fix = (
                "prepare the transcript slide with `degradation='visium'` (and the spot size of these data, "
                "`spot_diameter_um`) and train on it"
                if here in spots
                else "train on data prepared with `degradation='bin'`"
            )
            return (
                f"The model was trained on LR measured by {mine}, these data's LR is measured by {theirs}: it was never "
                f"trained or validated on this kind of measurement, so its maps may be wrong; {fix}."
            )
        a, b = self.units.spot_diameter_um, d.spot_diameter_um
        if trained in spots and a and b and abs(a - b) > 0.1 * max(a, b):
            return (
                f"The model was trained on LR measured by {mine}, these data's LR is measured by {theirs}: the spot "
                f"sizes differ by more than 10 %, so its maps may be off; prepare the training slide with "
                f"`spot_diameter_um={b:g}` and train again."
            )
        return None

    def gene_scale_for(self, prep: Prepared) -> np.ndarray:
        """Per-gene scale of the model units on ``prep``'s slide, in the model's gene order.

        On a slide the model was trained on, the scale it trained with there. On another slide, the HR scale is
        estimated from that slide's LR counts: ``lr_scale_slide · gene_scale / lr_scale`` with the training
        slides' ratio (their geometric mean over several) — expression levels may differ between slides (depth,
        capture efficiency), their HR/LR shape is assumed not to.
        """
        idx = [prep.genes.index(g) for g in self.genes]
        here = fingerprint(prep)
        sections = self.info.get("sections") or []
        for section in sections:
            if section.get("fingerprint") == here:
                return np.asarray(section["gene_scale"], dtype=np.float32)
        if self.info.get("prepared_fingerprint") == here:
            return self.gene_scale
        if sections:
            ratios = [np.log(np.asarray(s["gene_scale"], np.float64) / np.maximum(np.asarray(s["lr_scale"]), 1e-6))
                      for s in sections]  # fmt: skip
            ratio = np.exp(np.mean(ratios, axis=0))
        else:
            ratio = self.gene_scale / np.maximum(self.lr_scale, 1e-6)
        return (prep.lr_scale[idx] * ratio).astype(np.float32)


@dataclass(frozen=True)
class Guard:
    """What validation decided for a model (:attr:`DiffST.guard`), fitted by :func:`~diffst.tl._guard.fit_guard`.

    ``alpha``: per gene, the weight of the model's map against the image floor (``mean = α·model + (1 − α)·floor``);
    ``std_scale``: per gene, the factor that calibrates the std; ``std_noise``: ``"poisson"`` when the std adds
    Poisson counting noise to the sample spread, ``None`` when it is the spread alone; ``validation``: the comparison
    table (``method → {"pcc", "rmse"}``, methods ``model``, ``guarded``, ``bicubic``, ``image_floor``; ``None`` for
    the floor fallback); ``coverage_val``: the share of validation counts within mean ± 2 std after calibration
    (``None`` without HR truth); ``n_samples`` and ``average_flips``: the maps it was fitted on; ``pixels``: the
    validation pixels (HR truth) or ``spots``: the held-out spots (spots alone) it was fitted on; ``fallback``: why
    the model is replaced by the floor, for a model never validated (``None`` otherwise).
    """

    alpha: tuple[float, ...]
    std_scale: tuple[float, ...]
    std_noise: str | None
    validation: dict[str, dict[str, float]] | None
    coverage_val: float | None = None
    n_samples: int = 1
    average_flips: bool = False
    pixels: int = 0
    spots: int = 0
    fallback: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", tuple(float(a) for a in self.alpha))
        object.__setattr__(self, "std_scale", tuple(float(c) for c in self.std_scale))

    @classmethod
    def floor_only(cls, n_genes: int, why: str) -> Guard:
        """Every gene the image floor (``α = 0``) with a Poisson std: what a model never validated is replaced by."""
        return cls(alpha=(0.0,) * n_genes, std_scale=(1.0,) * n_genes, std_noise="poisson", validation=None,
                   fallback=why)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Plain values (saved with the model)."""
        return {**asdict(self), "alpha": list(self.alpha), "std_scale": list(self.std_scale)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Guard:
        return cls(**d)


@dataclass(frozen=True)
class ModelUnits:
    """The units, image and measurement of the data a model was trained on (:attr:`DiffST.units`).

    Data the model is applied to must match them (:meth:`DiffST.check_compatible`).
    """

    hr_um: float
    lr_um: float
    scale: int
    image_um: float
    #: "rgb" (brightfield) or "fluorescence"
    kind: str
    channels: tuple[str, ...]
    #: how LR arises from HR in the training data ("bin", "visium", "spots") and the spot size and pitch
    degradation: str
    spot_diameter_um: float | None
    spot_pitch_um: float | None
    #: "transcripts", "spots" or "bins"
    measurement: str
    #: the panel-context genes whose LR the model reads besides its genes'
    context_genes: tuple[str, ...] = ()

    @classmethod
    def of(cls, prep: Prepared, image_um: float) -> ModelUnits:
        """The units of prepared data, as a model trained on them records them."""
        d = prep.record.degradation
        return cls(hr_um=float(prep.grid.hr_um), lr_um=float(prep.grid.lr_um), scale=int(prep.grid.scale),
                   image_um=float(image_um), kind=str(prep.image.kind), channels=tuple(map(str, prep.image.channels)),
                   degradation=str(d.name), spot_diameter_um=d.spot_diameter_um, spot_pitch_um=d.spot_pitch_um,
                   measurement=str(prep.record.measurement), context_genes=tuple(map(str, prep.context_genes)))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Plain values (saved with the model)."""
        d = asdict(self)
        return {**d, "channels": list(self.channels), "context_genes": list(self.context_genes)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelUnits:
        return cls(**{**d, "channels": tuple(d["channels"]), "context_genes": tuple(d["context_genes"])})


def fingerprint(prep: Prepared) -> str:
    """A short stable identifier of a prepared dataset (grid, genes, sources, normalisation)."""
    import hashlib
    import json

    a = prep.record.to_dict()
    key = json.dumps(
        {k: a.get(k) for k in ("grid", "genes", "sources", "coordinate_system", "normalisation", "measurement")},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:12]
