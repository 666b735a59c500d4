"""One place that picks the device: cuda > mps > cpu, or the one asked for if it is there."""
from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")


def available_devices() -> list[str]:
    """Devices this machine can run on, best first."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found + ["cpu"]


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` gives the best available device; asking for one that is not there is an error."""
    if name == "auto":
        return torch.device(available_devices()[0])
    if name not in DEVICES:
        raise ValueError(f"Unknown device {name!r}; choose one of {', '.join(DEVICES)}.")
    if name not in available_devices():
        raise ValueError(f"Device {name} is not available on this machine "
                         f"(available: {', '.join(available_devices())}).")
    return torch.device(name)
