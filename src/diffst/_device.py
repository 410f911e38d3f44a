"""Which device the model runs on: ``"auto"`` is CUDA when there is one, then Apple's MPS, else the CPU."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["lightning_device", "resolve_device"]


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The :class:`torch.device` that ``device`` names, checked to exist on this machine.

    ``"auto"``: ``cuda`` (the current GPU) when PyTorch sees one, else ``mps`` (Apple silicon), else ``cpu``.
    ``"cuda"``, ``"cuda:1"``, ``"mps"`` and ``"cpu"`` are taken as they are; one this machine does not have is an
    error that says so.
    """
    if isinstance(device, torch.device):
        name = str(device)
    elif isinstance(device, str):
        name = device.strip().lower()
    else:
        msg = f"`device` must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got {device!r}."
        raise ValueError(msg)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        msg = f"`device` must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got {device!r}."
        raise ValueError(msg) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            msg = (
                f"`device={name!r}` asks for a CUDA GPU, but PyTorch sees none (torch.cuda.is_available() is False: "
                "no NVIDIA GPU, or a CPU build of PyTorch). Pass device='cpu' (or 'auto'), or install the PyTorch "
                "build for your CUDA driver."
            )
            raise ValueError(msg)
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            msg = f"`device={name!r}`: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0."
            raise ValueError(msg)
        return torch.device("cuda", index)
    if dev.type == "mps" and not _mps_available():
        msg = f"`device={name!r}` asks for Apple's MPS, which this machine or PyTorch build does not offer; pass 'cpu'."
        raise ValueError(msg)
    if dev.type not in ("cpu", "cuda", "mps"):
        msg = f"`device` must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got {device!r}."
        raise ValueError(msg)
    return dev


#: Precisions ``super_resolve`` accepts.
PRECISIONS = ("auto", "float32", "bfloat16")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively.

    A CUDA GPU that supports it, or a CPU with AVX512-BF16/AMX (oneDNN's check); elsewhere bfloat16 is emulated and
    slower than float32. A torch without oneDNN's check (a private op) is taken to have no native bfloat16, so
    ``"auto"`` then stays in float32: slower at worst, never different maps.
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the network's forward passes at inference: ``None`` for float32.

    ``"auto"``: bfloat16 where the device computes it natively (:func:`native_bf16`), else float32.
    """
    if precision not in PRECISIONS:
        msg = f"`precision` must be one of {PRECISIONS}; got {precision!r}."
        raise ValueError(msg)
    if precision == "float32" or (precision == "auto" and not native_bf16(device)):
        return None
    if device.type == "mps":
        msg = "`precision='bfloat16'` is not supported on MPS; pass 'float32' or 'auto'."
        raise ValueError(msg)
    return torch.bfloat16


def lightning_device(device: torch.device, devices: int | list[int]) -> dict[str, Any]:
    """Lightning's ``accelerator`` and ``devices`` for a resolved device (``devices``: how many, for DDP)."""
    if device.type == "cuda":
        if isinstance(devices, int) and devices == 1:
            return {"accelerator": "gpu", "devices": [device.index or 0]}
        return {"accelerator": "gpu", "devices": devices}
    if device.type == "mps":
        return {"accelerator": "mps", "devices": 1}
    return {"accelerator": "cpu", "devices": devices}
