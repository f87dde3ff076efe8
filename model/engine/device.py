"""Device selection and mixed precision: CUDA when present, the same code on CPU."""
from __future__ import annotations

import contextlib
import re

import torch

from pipeline.errors import Yt8mError

_DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceError(Yt8mError):
    """The requested device is malformed or not present on this machine."""


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a ``--device`` flag into a device: ``auto`` (first CUDA device when present, else CPU), ``cpu``,
    ``cuda`` or ``cuda:N``. Asking for CUDA on a machine without it is an error rather than a silent CPU run."""
    spec = str(spec).strip().lower()
    if not _DEVICE_SPEC.match(spec):
        raise DeviceError(f"--device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {spec} asked for CUDA but torch sees no CUDA device "
                          f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    device = torch.device(spec)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise DeviceError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    return torch.device("cuda", index)


def autocast(device: torch.device | str, enabled: bool = True):
    """bfloat16 autocast on CUDA (no loss scaling needed, unlike float16); a no-op context on CPU, where bf16
    matmuls are slower than float32 on most hosts and would change the numbers tests compare against."""
    device = torch.device(device)
    if device.type == "cuda" and enabled:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
