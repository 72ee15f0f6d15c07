"""Device selection, once for every job kind: ``auto`` means CUDA when torch sees a device.

Light on purpose: ``Device`` and :func:`device_type` cost nothing for ``cpu``; torch is loaded
only when a caller asks torch to decide (``auto`` or ``cuda``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Device = Literal["auto", "cpu", "cuda"]


def resolve_device(device: Device = "auto") -> torch.device:
    """``auto`` means CUDA when a CUDA device is present, else the CPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("MEDBATCH_DEVICE=cuda but torch sees no CUDA device")
    return torch.device(device)


def device_type(device: Device) -> str:
    """``cpu`` without loading torch; otherwise torch decides (``auto``: CUDA when present)."""
    if device == "cpu":
        return "cpu"
    return resolve_device(device).type
