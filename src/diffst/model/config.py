"""The Diff-ST configuration: one dataclass with named presets (nanoGPT's ``GPTConfig`` style)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np

__all__ = ["DiffSTConfig"]

PresetName = Literal["paper", "default", "tiny"]


@dataclass
class DiffSTConfig:
    """Every size and hyper-parameter of Diff-ST.

    Physical sizes are in µm; pixel sizes are derived (:attr:`hr_px`, :attr:`image_px`, ...).
    The config is JSON-serialisable through :func:`dataclasses.asdict` and restored with
    :meth:`from_dict`. The bare defaults are the ``"default"`` preset (see :meth:`preset`).

    Attributes
    ----------
    n_genes
        Number of genes ``G`` (channels of the gene maps, nodes of the CIGC-Graph).
    image_channels
        Channels of the tissue image: 3 for H&E RGB, any number for fluorescence (DAPI, IF).
    hr_um, scale, tile_um, image_um
        HR pixel size, SR factor (LR pixel = ``scale * hr_um``), tile side and image pixel size, in µm.
    cell_patch_um, n_cell_patches
        Side of the cell-level image patches (paper: 160 µm) and their number ``M``. ``None`` derives
        ``M = ceil(tile_um / cell_patch_um) ** 2`` evenly spaced (overlapping where needed) patches;
        an explicit value must be a square number.
    base_channels, channel_mult, num_res_blocks, attention, dropout
        The UNet denoiser: width of the first level, width multiplier per level (each level after the
        first halves the resolution), ResBlocks per level, self-attention at the lowest resolution.
    d_tissue, d_cell, d_attn, tissue_blocks
        Channels ``d_t`` of F_tissue, ``d_c`` of F_cell, ``d`` of the cross-attention (paper Table 3:
        128 each) and ResBlocks of the tissue-level encoder at the HR grid.
    cond_channels
        Channels of the ST-branch features F_y and of the fused condition handed to the UNet.
    cam_window, cam_dim
        Window side ``a`` of the cross-modal adaptive modulation (paper: 32) and the channel count
        ``c`` that F_y and F_h are projected to before it (the filter FC maps ``c*c -> c*c``).
    graph_grid, graph_node_channels, graph_alpha
        CIGC-Graph node features: each gene map is encoded to ``graph_node_channels`` maps of
        ``graph_grid x graph_grid``, so ``C = graph_node_channels * graph_grid**2`` (paper: 1 x 26 x 26
        = 676); ``alpha`` balances F_mid against F_x (paper: 0.2).
    cam, cigc_graph, hierarchical
        Ablation switches (paper Table 2): concatenation instead of CAM + disentangling; genes as
        plain channels instead of the gene graph; tissue-level image features only.
    num_train_timesteps, beta_schedule, beta_start, beta_end, prediction_type
        The diffusion (diffusers scheduler arguments). ``prediction_type="sample"`` (the default
        outside the paper preset) predicts the clean residual; see :class:`~diffst.model.Diffusion`.
    objective
        ``"refiner"`` (the default): predictor–refiner Diff-ST. The network, called with an empty ``x_t`` at the
        extra timestep ``t = T``, is a deterministic *mean head* trained with MSE (the conditional mean, what PCC and
        RMSE reward); the diffusion, same network at ``t < T``, models the residual ``x0 - up(y) - mean``, so samples
        scatter around the mean head and their spread is the uncertainty. ``"diffusion"``: the paper's Diff-ST (the
        mean map is the average of samples). ``"regression"``: the same network trained with MSE only (the
        deterministic baseline, no diffusion).
    supervision, hide_fraction
        What training learns from. ``"hr"``: HR truth (transcripts, bins). ``"lr"``: the LR measurement alone
        (a Visium slide without matched HR data), through the data's degradation operator: each step hides a share
        ``hide_fraction`` of the observed LR pixels (spots) from the input and trains the mean head so that its map,
        degraded, reproduces the hidden spots' counts (see :mod:`diffst.model.weak`). Needs ``objective="regression"``:
        there is no HR residual for a diffusion to learn; the spread comes from leave-spots-out predictions instead.
    lr_weight
        With ``supervision="hr"``: the weight of a self-supervised term learnt from the LR alone, everywhere on the
        slide (also where there is no HR truth to train on): each step, as many windows as the batch are drawn
        from all the tiles, a share ``hide_fraction`` of their LR pixels is hidden, and the mean head's map, degraded,
        must reproduce the hidden pixels' counts (the loss of ``supervision="lr"``). 0 (default): off.
    residual
        Diffuse ``x0 - base`` instead of ``x0`` (SR3/SRDiff style) and add the base back after sampling.
    base, stain_exponents
        The map the residual is taken around, and the LR condition the network reads. ``"fitted"`` (the default) is
        the image floor with a per-gene density of all the image's stains, whose exponents ``stain_exponents``
        (``G × K``) :func:`diffst.tl.train` chooses on the training tiles (:func:`~diffst.model.fit_stain_exponents`;
        until then, or for genes where the fit does not beat it, the floor itself). ``"floor"`` is the training-free
        image floor (:func:`~diffst.model.image_floor`: bicubic × nuclear-stain density, each LR pixel keeping its
        counts), so an untrained model already returns the floor and training learns what it misses; ``"bicubic"`` is
        the mask-aware bicubic up-sampling :func:`~diffst.model.upsample_lr` (the paper's setting).
    image_encoder, feature_channels
        Where the tissue-level image features come from. ``"learned"`` (the default, ``feature_channels=0``): the
        tissue encoder learns them from the image on this slide. Otherwise the name of the encoder of
        :func:`diffst.pp.image_features` (``"stain"``, ``"timm:<model>"``) whose ``feature_channels`` features per HR
        pixel come with the image (appended as channels after the ``image_channels`` image channels, repeated over
        each HR pixel's image pixels) and replace the learned tissue encoder; the cell level, CAM and the gene graph
        keep their meaning.
    context_genes
        Channels of the panel context: the LR maps of genes that are measured but not predicted (``prepare``'s
        ``context_genes``), read by the ST branch beside the genes' own LR maps; 0 for none.
    image_kind, nuclear_channel
        The image type (``"rgb"`` H&E or ``"fluorescence"``) and, for fluorescence, the nuclear (DAPI) channel the floor
        reads; set from the prepared data.
    x0_range
        Range the sampler clips its x0 estimates to, in normalised units (zero counts are -1;
        values above 1 occur where a gene exceeds its robust per-gene scale).
    sampler, sample_steps
        Default sampler (``"ddpm"`` = ancestral with all training steps, ``"ddim"``, ``"dpmsolver"`` =
        DPM-Solver++) and its number of steps.
    curriculum_start, curriculum_end
        Quantile ``q`` of the per-tile patch entropies used as the threshold γ at training progress 0
        and 1 (linear in between): the cell branch keeps the ``ceil((1 - q) * M)`` most complex patches.
    dis_weight
        Weight of the disentangling loss L_dis in the training objective.
    learning_rate, weight_decay, adam_betas, adam_eps, batch_size, ema_decay
        Optimisation (AdamW) settings for the training loop; ``ema_decay`` of the weight average used
        for sampling. The paper's learning rate is 1e-4 over 200 GPU epochs; the ``default`` preset uses
        1e-3 with batch 8 so that a few minutes of CPU training (~1000 steps) converge.

    """

    # data geometry
    n_genes: int = 25
    image_channels: int = 3
    hr_um: float = 10.0
    scale: int = 10
    tile_um: float = 400.0
    image_um: float = 2.0
    cell_patch_um: float = 160.0
    n_cell_patches: int | None = None
    # UNet denoiser
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention: bool = True
    dropout: float = 0.0
    # image encoder (hierarchical cell-to-tissue)
    d_tissue: int = 32
    d_cell: int = 32
    d_attn: int = 32
    tissue_blocks: int = 1
    # CAM + disentangling
    cond_channels: int = 32
    cam_window: int = 8
    cam_dim: int = 16
    # CIGC-Graph
    graph_grid: int = 8
    graph_node_channels: int = 4
    graph_alpha: float = 0.2
    # ablation switches
    cam: bool = True
    cigc_graph: bool = True
    hierarchical: bool = True
    # diffusion
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "sample"
    residual: bool = True
    base: str = "fitted"
    stain_exponents: list[list[float]] | None = None
    image_kind: str = "rgb"
    nuclear_channel: int = 0
    image_encoder: str = "learned"
    feature_channels: int = 0
    context_genes: int = 0
    objective: str = "refiner"
    supervision: str = "hr"
    hide_fraction: float = 0.5
    lr_weight: float = 0.0
    x0_range: tuple[float, float] = (-1.0, 3.0)
    sampler: str = "dpmsolver"
    sample_steps: int = 5
    # curriculum and objective
    curriculum_start: float = 0.0
    curriculum_end: float = 0.5
    dis_weight: float = 0.01
    # optimisation (used by the training loop)
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    batch_size: int = 8
    ema_decay: float = 0.995

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.x0_range = (float(self.x0_range[0]), float(self.x0_range[1]))
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))
        self._validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def lr_um(self) -> float:
        """LR pixel size in µm."""
        return self.hr_um * self.scale

    @property
    def hr_px(self) -> int:
        """HR tile side in pixels, ``H = tile_um / hr_um``."""
        return _as_int(self.tile_um / self.hr_um, "tile_um / hr_um")

    @property
    def lr_px(self) -> int:
        """LR tile side in pixels, ``h = H / scale``."""
        return self.hr_px // self.scale

    @property
    def image_px(self) -> int:
        """Image tile side in pixels, ``tile_um / image_um``."""
        return _as_int(self.tile_um / self.image_um, "tile_um / image_um")

    @property
    def image_per_hr(self) -> int:
        """Image pixels per HR pixel (per side), ``hr_um / image_um``."""
        return _as_int(self.hr_um / self.image_um, "hr_um / image_um")

    @property
    def cell_patch_px(self) -> int:
        """Cell-level patch side in image pixels (320 px = 160 µm at 0.5 µm/px in the paper)."""
        return min(round(self.cell_patch_um / self.image_um), self.image_px)

    @property
    def cell_grid(self) -> int:
        """Cell-level patches per tile side."""
        if self.n_cell_patches is not None:
            return math.isqrt(self.n_cell_patches)
        return max(1, math.ceil(self.tile_um / self.cell_patch_um - 1e-6))

    @property
    def n_patches(self) -> int:
        """Number ``M`` of cell-level patches per tile."""
        return self.cell_grid**2

    @property
    def graph_dim(self) -> int:
        """Node feature size ``C`` of the CIGC-Graph."""
        return self.graph_node_channels * self.graph_grid**2

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict of the fields."""
        d = asdict(self)
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiffSTConfig:
        """Config from :meth:`to_dict` / :func:`dataclasses.asdict` output (unknown keys are an error)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            msg = f"Unknown DiffSTConfig fields {unknown}; known fields are {sorted(names)}."
            raise ValueError(msg)
        return cls(**d)

    @classmethod
    def preset(cls, name: PresetName = "default", **overrides: Any) -> DiffSTConfig:
        """A named preset, optionally with some fields overridden.

        Parameters
        ----------
        name
            ``"paper"``: the paper's sizes (Table 3: N = 25 genes, M = 256 cell patches of 320 px,
            d_t = d_c = d = 128, a = 32, C = 676, α = 0.2, AdamW lr 1e-4, wd 1e-5, batch 4, 1000 steps,
            ε-prediction sampled with 1000 DDPM steps) on 2500 µm tiles, i.e. 250 x 250 HR pixels at
            10 µm, 25 x 25 LR pixels at 100 µm and 5000 x 5000 image pixels at 0.5 µm.
            ``"default"``: small enough to train on a 2-core CPU in minutes (400 µm tiles, 40 x 40 HR,
            4 x 4 LR, 200 x 200 image, 9 cell patches).
            ``"tiny"``: for unit tests.
        overrides
            Fields to change, e.g. ``n_genes=10``.

        """
        presets: dict[str, dict[str, Any]] = {
            "paper": {
                "tile_um": 2500.0,
                "image_um": 0.5,
                "base_channels": 64,
                "channel_mult": (1, 2, 3, 4),
                "num_res_blocks": 2,
                "d_tissue": 128,
                "d_cell": 128,
                "d_attn": 128,
                "tissue_blocks": 2,
                "cond_channels": 128,
                "cam_window": 32,
                "cam_dim": 32,
                "graph_grid": 26,
                "graph_node_channels": 1,
                "prediction_type": "epsilon",
                "objective": "diffusion",
                "base": "bicubic",
                "sampler": "ddpm",
                "sample_steps": 1000,
                "learning_rate": 1e-4,
                "batch_size": 4,
                "ema_decay": 0.9999,
            },
            "default": {},  # the dataclass defaults
            "tiny": {
                "n_genes": 5,
                "tile_um": 160.0,
                "scale": 4,
                "image_um": 5.0,
                "cell_patch_um": 80.0,
                "base_channels": 16,
                "channel_mult": (1, 2),
                "d_tissue": 16,
                "d_cell": 16,
                "d_attn": 16,
                "cond_channels": 16,
                "cam_window": 4,
                "cam_dim": 8,
                "graph_grid": 4,
                "graph_node_channels": 2,
                "sample_steps": 10,
                "batch_size": 2,
                "learning_rate": 1e-3,
                "ema_decay": 0.9,
            },
        }
        if name not in presets:
            msg = f"Unknown preset {name!r}; choose one of {sorted(presets)}."
            raise ValueError(msg)
        return cls(**{**presets[name], **overrides})

    # ------------------------------------------------------------------ checks
    def _validate(self) -> None:
        if self.n_genes < 1 or self.image_channels < 1:
            msg = f"n_genes and image_channels must be >= 1, got {self.n_genes} and {self.image_channels}."
            raise ValueError(msg)
        hr_px, _ = self.hr_px, self.image_px  # raise if not integer
        _ = self.image_per_hr
        if self.scale < 1 or hr_px % self.scale:
            msg = f"The HR tile side ({hr_px} px = tile_um / hr_um) must be a multiple of scale={self.scale}."
            raise ValueError(msg)
        if self.n_cell_patches is not None and math.isqrt(self.n_cell_patches) ** 2 != self.n_cell_patches:
            msg = f"n_cell_patches must be a square number (patches on a k x k grid), got {self.n_cell_patches}."
            raise ValueError(msg)
        if self.objective not in ("refiner", "diffusion", "regression"):
            msg = f"objective must be 'refiner', 'diffusion' or 'regression', got {self.objective!r}."
            raise ValueError(msg)
        if self.supervision not in ("hr", "lr"):
            msg = f"supervision must be 'hr' or 'lr', got {self.supervision!r}."
            raise ValueError(msg)
        if self.supervision == "lr" and self.objective != "regression":
            msg = (
                f"supervision='lr' trains the mean head only: it needs objective='regression', got {self.objective!r}."
            )
            raise ValueError(msg)
        if self.lr_weight < 0 or (self.lr_weight > 0 and self.supervision != "hr"):
            msg = f"lr_weight must be ≥ 0, and > 0 only with supervision='hr'; got {self.lr_weight}."
            raise ValueError(msg)
        if not 0.0 < self.hide_fraction < 1.0:
            msg = f"hide_fraction must lie in (0, 1), got {self.hide_fraction}."
            raise ValueError(msg)
        if self.base not in ("fitted", "floor", "bicubic"):
            msg = f"base must be 'fitted', 'floor' or 'bicubic', got {self.base!r}."
            raise ValueError(msg)
        if self.stain_exponents is not None:
            ex = np.asarray(self.stain_exponents, dtype=float)
            if ex.ndim != 2 or ex.shape[0] != self.n_genes or not np.all(np.isfinite(ex)):
                msg = (
                    f"stain_exponents must be finite, one row per gene ({self.n_genes} × stains); got shape {ex.shape}."
                )
                raise ValueError(msg)
        if (self.image_encoder == "learned") != (self.feature_channels == 0) or self.feature_channels < 0:
            msg = (
                "image_encoder='learned' has no feature channels and any other encoder needs some; got "
                f"image_encoder={self.image_encoder!r}, feature_channels={self.feature_channels}."
            )
            raise ValueError(msg)
        if self.context_genes < 0:
            msg = f"context_genes must be ≥ 0, got {self.context_genes}."
            raise ValueError(msg)
        if self.image_kind not in ("rgb", "fluorescence"):
            msg = f"image_kind must be 'rgb' or 'fluorescence', got {self.image_kind!r}."
            raise ValueError(msg)
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            msg = f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {self.prediction_type!r}."
            raise ValueError(msg)
        if self.sampler not in ("ddpm", "ddim", "dpmsolver"):
            msg = f"sampler must be 'ddpm', 'ddim' or 'dpmsolver', got {self.sampler!r}."
            raise ValueError(msg)
        if not 0.0 <= self.curriculum_start <= 1.0 or not 0.0 <= self.curriculum_end < 1.0:
            msg = (
                f"curriculum_start must lie in [0, 1] and curriculum_end in [0, 1), "
                f"got {self.curriculum_start} and {self.curriculum_end}."
            )
            raise ValueError(msg)
        if not 0.0 <= self.graph_alpha <= 1.0:
            msg = f"graph_alpha must lie in [0, 1], got {self.graph_alpha}."
            raise ValueError(msg)


def _as_int(value: float, what: str) -> int:
    n = round(value)
    if n < 1 or abs(value - n) > 1e-6:
        msg = f"{what} must be a positive whole number, got {value}."
        raise ValueError(msg)
    return n
