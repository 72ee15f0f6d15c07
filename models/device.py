"""Device selection, once for every job kind: ``auto`` means CUDA when torch sees a device.

Light on purpose: ``Device`` and :func:`device_type` cost nothing for ``cpu``; torch is loaded
only when a caller asks torch to decide (``auto`` or ``cuda``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Device = Literal["auto", "cpu", "cuda"]


class DeviceUnavailable(RuntimeError):
    """CUDA asked for by name where torch sees no CUDA device."""

    def __init__(self) -> None:
        super().__init__(
            "MEDBATCH_DEVICE=cuda but torch sees no CUDA device "
            "(use MEDBATCH_DEVICE=auto or cpu on this machine)"
        )


def resolve_device(device: Device = "auto") -> torch.device:
    """``auto`` means CUDA when a CUDA device is present, else the CPU; ``cuda`` without one
    raises :class:`DeviceUnavailable`."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable
    return torch.device(device)


def device_type(device: Device) -> str:
    """``cpu`` without loading torch; otherwise torch decides (``auto``: CUDA when present)."""
    if device == "cpu":
        return "cpu"
    return resolve_device(device).type


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """PyTorch's threads an operator on the CPU for the code inside (0: leave them as they are),
    the process's own number restored after. A scoring batch is small and shares the machine
    with its database: one thread does it fastest, while a genome or chem tile in the same
    process keeps every core for its GEMMs. Setting the number costs microseconds."""
    if not threads:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
