"""Where the computation runs: ``--device {auto,cpu,cuda,cuda:N}`` resolved once, and its peak memory.

Every command and config resolves its device through :func:`resolve_device`, so ``auto``, a missing
GPU and an out-of-range index mean the same everywhere. Nothing here changes torch's global
settings. On the CPU every code path is the one fwsvd always ran (``tensor.to(cpu)`` of a CPU
tensor is the tensor itself), so results there are bit-identical to a run without a device.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

from .errors import FwsvdError

__all__ = [
    "COMPUTE_DTYPES", "DEVICE_CHOICES", "DEVICE_HELP", "StageMemory", "check_device", "computing_in", "memory_report", "model_device", "place",
    "reset_peak_memory", "resolve_device",
]

#: dtypes calibration may run the model in (statistics are float32/float64 whatever it is).
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")

#: The forms ``--device`` takes (``cuda:N`` names the N-th visible GPU).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
DEVICE_HELP = (
    "where the model runs: auto (a GPU when torch sees one, else the CPU), cpu, cuda, or cuda:N (the N-th visible GPU); "
    "statistics are accumulated in float32/float64 on it and saved from the CPU, so outputs have the same format everywhere"
)


def check_device(spec: Any) -> str:
    """``spec`` if it is one of the forms of :data:`DEVICE_CHOICES` (whether or not that device exists here).

    Raises:
        FwsvdError: for anything else, naming the value and the accepted forms.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    if isinstance(spec, str):
        if spec in ("auto", "cpu", "cuda"):
            return spec
        kind, _, index = spec.partition(":")
        if kind == "cuda" and index.isdigit():
            return spec
    raise FwsvdError(f"--device {spec!r} is not a device: pass auto, cpu, cuda or cuda:N (N the index of a visible GPU)")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The :class:`torch.device` that ``spec`` names on this machine.

    ``auto`` (or ``None``) takes a GPU when :func:`torch.cuda.is_available`, else the CPU. Under
    ``torchrun`` ``auto`` and ``cuda`` take ``cuda:LOCAL_RANK`` (modulo the GPUs visible), so that
    every process of a node has its own GPU.

    Raises:
        FwsvdError: for an unknown form, ``cuda`` without a GPU, or ``cuda:N`` past the last GPU.
    """
    spec = check_device("auto" if spec is None else spec)
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise FwsvdError(f"--device {spec}: torch sees no GPU here (a CPU-only build, or no CUDA driver): pass --device cpu or auto")
    count = torch.cuda.device_count()
    if spec in ("auto", "cuda"):
        local = os.environ.get("LOCAL_RANK", "")
        return torch.device("cuda", int(local) % count if local.isdigit() else torch.cuda.current_device())
    index = int(spec.partition(":")[2])
    if index >= count:
        raise FwsvdError(f"--device {spec}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}: pass one of those, or cuda")
    return torch.device("cuda", index)


def place(model: torch.nn.Module, spec: str | torch.device | None) -> torch.device:
    """Move ``model`` in place to the device ``spec`` names (:func:`resolve_device`); a model already there
    (every parameter) is left untouched, so a CPU run is exactly the run without a device. Returns the device."""
    device = resolve_device(spec)
    if any(p.device != device for p in model.parameters()):
        model.to(device)
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s parameters are (its inputs go there); the CPU for a model holding none,
    such as an ONNX Runtime session wrapped as a module."""
    first = next(iter(model.parameters()), None)
    return torch.device("cpu") if first is None else first.device


@contextlib.contextmanager
def computing_in(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """``model``'s floating-point parameters and buffers as ``dtype`` copies on ``device`` for the duration, then
    the originals back (the same tensors: nothing is lost to the rounding). Parameters keep their identity (their
    ``data`` changes), so ties and saved flags hold. Nothing happens where they already are that dtype there.

    Used to calibrate in half precision on a GPU while the float32 weights wait where they were (the CPU).
    """
    moved: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is None or not t.is_floating_point() or t.device.type == "meta" or (t.device == device and t.dtype == dtype):
                    continue
                moved.append((table, key, t.data))
                if isinstance(t, torch.nn.Parameter):
                    t.data = t.data.to(device=device, dtype=dtype)
                else:
                    table[key] = t.to(device=device, dtype=dtype)
    try:
        yield
    finally:
        for table, key, original in moved:
            t = table[key]
            if isinstance(t, torch.nn.Parameter):
                t.data = original
            else:
                table[key] = original


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for :func:`memory_report` on a GPU (the process's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def memory_report(device: torch.device) -> dict[str, Any]:
    """The device used and the peak memory so far: the process's resident set, and on a GPU its allocations.

    Returns:
        ``{"device": "cpu" | "cuda:N", "peak_rss_bytes": int, ["peak_gpu_bytes": int]}``; the GPU
        peak is since the last :func:`reset_peak_memory` on that device.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows has no getrusage
        rss = 0
    else:
        # ru_maxrss is in KiB on Linux and bytes on macOS.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    out: dict[str, Any] = {"device": str(device), "peak_rss_bytes": int(rss)}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


class StageMemory:
    """Seconds and peak memory per stage of a command (``with stages.stage("calibration"): ...``).

    On a GPU each stage's peak allocation is its own (the peak is reset as it starts); the process's
    peak resident set cannot be reset, so each stage reports the peak so far.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stages: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        reset_peak_memory(self.device)
        start = time.perf_counter()
        yield
        report = memory_report(self.device)
        report.pop("device")
        self.stages[name] = {"seconds": round(time.perf_counter() - start, 3), **report}

    def to_dict(self) -> dict[str, Any]:
        """``{"device": ..., "stages": {name: {"seconds", "peak_rss_bytes"[, "peak_gpu_bytes"]}}}``."""
        return {"device": str(self.device), "stages": dict(self.stages)}
