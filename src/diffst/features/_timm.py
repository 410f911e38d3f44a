"""Any timm model as an image encoder: pretrained pathology foundation models (UNI, H-optimus, Virchow, Phikon …)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np

from ._encoder import ImageEncoder, weights_hash


class TimmEncoder(ImageEncoder):
    """A timm model's patch (ViT) or last-stage (CNN) features, resampled to one vector per HR pixel.

    The slide is read at ``um_per_px`` and cut into the model's input size (``timm.data.resolve_data_config``), with
    its own normalisation; token grids are stitched, and each HR pixel takes the mean of the tokens it overlaps,
    weighted by the overlap.

    Parameters
    ----------
    model_name
        A timm model name, e.g. ``"vit_small_patch16_224"`` or ``"hf-hub:MahmoodLab/UNI"``.
    pretrained
        Load pretrained weights (from the Hugging Face hub when online, or ``weights``).
    weights
        A local weights file (``.safetensors``, ``.bin``, ``.pth``) for offline machines; implies ``pretrained``.
    um_per_px
        µm per pixel the model was trained at: pathology models mostly at 20× (≈ 0.5 µm/px).
    device
        ``"cpu"``, ``"cuda"``, ``"mps"``; default: CUDA when available, else CPU.
    batch_size
        Model inputs per forward pass.
    model_kwargs
        Passed to ``timm.create_model``: the architecture arguments a model card gives (``init_values=1e-5`` for
        UNI, ``mlp_layer``/``act_layer`` for Virchow2), ``pretrained_cfg_overlay`` (e.g. the model's ``mean`` and
        ``std`` when loading an architecture name with local ``weights``).

    """

    def __init__(
        self,
        model_name: str,
        *,
        pretrained: bool = True,
        weights: str | Path | None = None,
        um_per_px: float = 0.5,
        device: str | None = None,
        batch_size: int = 16,
        model_kwargs: dict | None = None,
    ) -> None:
        try:
            import timm
            from timm.data import resolve_data_config
        except ImportError as e:  # pragma: no cover - exercised where timm is absent
            msg = "`timm:` encoders need timm: `pip install timm` (with a torchvision that matches your torch)."
            raise ImportError(msg) from e
        import torch

        kwargs = dict(model_kwargs or {})
        if weights is not None:
            path = Path(weights).expanduser()
            if not path.is_file():
                msg = f"Weights file {str(path)!r} does not exist; pass the path of a downloaded checkpoint."
                raise FileNotFoundError(msg)
            kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), "file": str(path)}
            pretrained = True
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs).eval()
        self.data_config = resolve_data_config({}, model=self.model)
        self.input_px = int(self.data_config["input_size"][-1])
        self.mean = np.asarray(self.data_config["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(self.data_config["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.batch_size = int(batch_size)
        self.name, self.um_per_px = f"timm:{model_name}", float(um_per_px)
        self.pretrained = bool(pretrained)
        self._hash = weights_hash(self.model.state_dict())
        self.prefix = int(getattr(self.model, "num_prefix_tokens", 0))
        self.dim = int(self.model.num_features)
        self.context_um = 0.0

    def describe(self) -> dict:
        return {**super().describe(), "weights": self._hash, "pretrained": self.pretrained, "input_px": self.input_px}

    def fingerprint(self) -> str:
        return self._hash

    def _tokens(self, x: np.ndarray) -> np.ndarray:
        """Model inputs ``(B, 3, P, P)`` in [0, 1] → feature grids ``(B, D, h, w)``."""
        import torch

        batch = torch.from_numpy((x - self.mean) / self.std).to(self.device)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        with torch.inference_mode(), amp:
            out = self.model.forward_features(batch)
        out = out.float()
        if out.ndim == 3:  # ViT: (B, prefix + h·w, D)
            tokens = out[:, self.prefix :]
            side = int(round(tokens.shape[1] ** 0.5))
            out = tokens.reshape(len(x), side, side, -1).permute(0, 3, 1, 2)
        elif getattr(self.model, "output_fmt", "NCHW") == "NHWC":
            out = out.permute(0, 3, 1, 2)
        return out.cpu().numpy()

    def encode(self, crops: np.ndarray, per_hr: int) -> np.ndarray:
        b, c, h, w = crops.shape
        crops = crops[:, :3] if c >= 3 else np.repeat(crops[:, :1], 3, axis=1)
        p = self.input_px
        rows, cols = -(-h // p), -(-w // p)
        padded = np.zeros((b, 3, rows * p, cols * p), dtype=np.float32)
        padded[:, :, :h, :w] = crops
        inputs = padded.reshape(b, 3, rows, p, cols, p).transpose(0, 2, 4, 1, 3, 5).reshape(-1, 3, p, p)
        grids = np.concatenate([self._tokens(inputs[i : i + self.batch_size])
                                for i in range(0, len(inputs), self.batch_size)])  # fmt: skip
        d, th, tw = grids.shape[1:]
        stitched = (
            grids.reshape(b, rows, cols, d, th, tw).transpose(0, 3, 1, 4, 2, 5).reshape(b, d, rows * th, cols * tw)
        )
        # token (i, j) covers image pixels [i·t, (i+1)·t), t = p / th: each HR pixel averages the tokens it overlaps
        rows_w = _overlap(h // per_hr, per_hr, rows * th, p / th)
        cols_w = _overlap(w // per_hr, per_hr, cols * tw, p / tw)
        return np.einsum("ij,bdjk,lk->bdil", rows_w, stitched, cols_w, optimize=True).astype(np.float32)


def _overlap(n_out: int, out_px: float, n_in: int, in_px: float) -> np.ndarray:
    """``(n_out, n_in)`` weights: the share of output cell ``i`` (``out_px`` pixels) that input cell ``j`` covers."""
    lo_o = np.arange(n_out)[:, None] * out_px
    lo_i = np.arange(n_in)[None, :] * in_px
    inter = np.minimum(lo_o + out_px, lo_i + in_px) - np.maximum(lo_o, lo_i)
    return (np.clip(inter, 0.0, None) / out_px).astype(np.float32)
