"""Resumable calibration: the running sums are checkpointed to a safetensors file every few batches.

A checkpoint holds :class:`fwsvd.calibration.statistics.RunningSums` (the sums over the batches done so far) and a
*fingerprint* of everything that decides them: the model (its source, its weight files' sizes and
times, and a sample of every parameter's values), the calibration data file (path, size, time),
the calibration settings (samples, seed, max length, batch size, columns), the statistics asked
for, the targeted layers, and the process's place in a ``torchrun`` job. A run whose fingerprint
matches resumes after the batches already done (the sums are stored exactly, so the result is the
one an uninterrupted run gives); any difference is named and the checkpoint is replaced.

Where (see :func:`checkpoint_base`): beside ``--save-stats`` when given, else beside ``--out``, as
a hidden file ``.<name>.checkpoint.safetensors``; under ``torchrun`` each process writes its own
share's sums to ``.<name>.checkpoint.rank<R>-of-<N>.safetensors`` (no communication is needed to
checkpoint, and a job of another size does not read them). A successful command removes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..version import __version__
from .distributed import Context
from ..errors import FwsvdError
from .statistics import RunningSums

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_INTERVAL_S", "Checkpointing", "checkpoint_base", "fingerprint", "read_checkpoint", "remove_checkpoints", "write_checkpoint", "write_safetensors"]

_FORMAT = "fwsvd-calibration-checkpoint/1"
#: Without ``--checkpoint-every``: checkpoint after the first batch that ends this long after the
#: last checkpoint, and at least ten times the last write's duration (a 7B model's covariances are
#: tens of GiB: writing them must stay a small share of the run).
DEFAULT_INTERVAL_S = 300.0
_WRITE_SHARE = 10.0


def checkpoint_base(out: str | os.PathLike, save_stats: str | os.PathLike | None = None) -> Path:
    """The checkpoint file of a run that writes ``out`` (and ``save_stats``), for one process."""
    target = Path(save_stats if save_stats is not None else out).expanduser().absolute()
    return target.with_name(f".{target.name}.checkpoint.safetensors")


def _for_process(base: Path, ctx: Context) -> Path:
    if not ctx.active:
        return base
    return base.with_name(base.name.replace(".checkpoint.safetensors", f".checkpoint.rank{ctx.rank}-of-{ctx.world_size}.safetensors"))


def _remove_partials(path: Path) -> None:
    """Remove what killed writes of ``path`` left (:func:`fwsvd.storage.atomic.atomic_file` names them ``.NAME.XXXX.partial``)."""
    for partial in path.parent.glob(f".{path.name}.*.partial"):
        if partial.is_file() and not partial.is_symlink():
            partial.unlink(missing_ok=True)


def _is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a calibration checkpoint (by its safetensors metadata), so ours to replace."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == _FORMAT
    except (SafetensorError, OSError, ValueError):
        return False


def remove_checkpoints(base: Path) -> None:
    """Remove the checkpoint files of ``base`` (every process's, of any job size, and half-written ones)."""
    stem = base.name.removesuffix(".safetensors")
    for path in base.parent.glob(f"{stem}*.safetensors"):
        if path.is_file() and (path.name == base.name or path.name.startswith(f"{stem}.rank")) and _is_checkpoint(path):
            _remove_partials(path)
            path.unlink(missing_ok=True)


def _file_facts(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _parameters_digest(model: torch.nn.Module) -> str:
    """A cheap digest of the model's parameters: names, shapes, dtypes and ~1024 sampled values of each."""
    h = hashlib.sha256()
    for name, p in model.state_dict(keep_vars=True).items():
        h.update(f"{name}:{list(p.shape)}:{p.dtype};".encode())
        if p.device.type != "meta" and p.numel():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 1024)][:1024]
            h.update(sample.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(
    *,
    model: torch.nn.Module,
    source: str,
    task: str,
    calibration: Mapping[str, Any],
    kinds: Iterable[str],
    targets: Iterable[str],
    keep_full_fisher: bool,
    ctx: Context,
) -> dict[str, Any]:
    """Everything that decides a process's running sums (compared field by field on resume)."""
    folder = Path(source)
    model_files = []
    if folder.is_dir():
        model_files = [_file_facts(p) for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in (".safetensors", ".bin", ".gguf", ".json")]
    data = str(calibration.get("data"))
    data_path = Path(data).expanduser()
    data_facts: dict[str, Any] = {"path": str(data_path.absolute())}
    if data_path.is_file():
        data_facts.update(_file_facts(data_path))
    return {
        "library_version": __version__,
        "model": {"source": str(folder.absolute()) if folder.exists() else source, "task": task, "files": model_files, "parameters": _parameters_digest(model)},
        "data": data_facts,
        "calibration": {k: v for k, v in calibration.items() if k != "data"},
        "kinds": sorted(kinds),
        "keep_full_fisher": keep_full_fisher,
        "targets": hashlib.sha256("\n".join(targets).encode()).hexdigest(),
        "processes": {"world_size": ctx.world_size, "rank": ctx.rank},
    }


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32"}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file one tensor at a time.

    ``safetensors.torch.save_file`` first copies every tensor into one buffer, which doubles the
    memory of a checkpoint that holds every layer's covariance; here each tensor goes straight
    from its storage to the file.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for t in tensors.values():
            if t.numel():
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(path: Path, sums: RunningSums, facts: Mapping[str, Any]) -> None:
    """Write ``sums`` and their fingerprint to ``path`` atomically (a hidden temporary file, then a rename)."""
    from ..storage.atomic import follow_umask

    flat = {f"{name}::{key}": t for name, entry in sums.tensors.items() for key, t in entry.items()}
    meta = {
        "format": _FORMAT,
        "fingerprint": json.dumps(facts, sort_keys=True),
        "shared": json.dumps(sums.shared),
        "counts": json.dumps(sums.counts()),
    }
    from ..storage.atomic import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)  # on other nodes of a job the output's folder may not exist yet
    with atomic_file(path) as tmp:
        write_safetensors(tmp, flat, meta)
        follow_umask(tmp)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new)) for d in _differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def read_checkpoint(path: Path, facts: Mapping[str, Any]) -> RunningSums | None:
    """The running sums in ``path`` if its fingerprint is ``facts``; ``None`` (and a log line saying why) otherwise."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            old = json.loads(meta["fingerprint"])
            differ = _differences(old, json.loads(json.dumps(facts, sort_keys=True)))
            if differ:
                logger.info("ignoring calibration checkpoint %s: it was made with other settings (%s differ); starting over", path, ", ".join(differ[:4]))
                return None
            tensors: dict[str, dict[str, torch.Tensor]] = {}
            for key in f.keys():
                name, _, stat = key.rpartition("::")
                tensors.setdefault(name, {})[stat] = f.get_tensor(key)
            counts = json.loads(meta["counts"])
            shared = json.loads(meta["shared"])
        return RunningSums(tensors, dict(shared), int(counts["batches"]), int(counts["samples"]), int(counts["tokens"]), float(counts["loss_sum"]))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        logger.info("ignoring unreadable calibration checkpoint %s (%s); starting over", path, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None


@dataclass
class Checkpointing:
    """Checkpoint the running sums of a calibration to ``base`` (per process under ``torchrun``).

    Attributes:
        base: the checkpoint file of a single process (see :func:`checkpoint_base`).
        every: checkpoint after every ``every`` batches; ``None``: after the first batch that ends
            :data:`DEFAULT_INTERVAL_S` (and ten times the last write's duration) after the last one.
    """

    base: Path
    every: int | None = None
    _last: float = field(default=0.0, repr=False)
    _write_seconds: float = field(default=0.0, repr=False)

    def discard(self, ctx: Context) -> None:
        """Remove this process's checkpoint (once its output is safely written)."""
        path = _for_process(Path(self.base), ctx)
        _remove_partials(path)
        if path.is_file() and _is_checkpoint(path):
            path.unlink()

    def begin(self, facts: Mapping[str, Any], ctx: Context, total: int) -> tuple[RunningSums | None, Callable[[RunningSums], None]]:
        """The sums to resume from (``None``: start over) and the callback that checkpoints after each batch."""
        path = _for_process(Path(self.base), ctx)
        if (path.exists() or path.is_symlink()) and not (path.is_file() and _is_checkpoint(path)):
            raise FwsvdError(
                f"{path} is in the way of this run's calibration checkpoint and is not one: move it away, "
                "or pass --checkpoint-every 0 to calibrate without checkpoints"
            )
        _remove_partials(path)  # half-written by a killed run
        start = read_checkpoint(path, facts)
        if start is not None:
            if start.batches > total:
                logger.info("ignoring calibration checkpoint %s: it counts %d batches of %d", path, start.batches, total)
                start = None
            else:
                logger.info("resuming calibration from %s: %d of %d batches already done%s", path, start.batches, total,
                            f" (by each of {ctx.world_size} processes' share)" if ctx.active else "")
        self._last = time.monotonic()

        def save(sums: RunningSums) -> None:
            now = time.monotonic()
            if self.every is not None:
                due = sums.batches % self.every == 0
            else:
                due = now - self._last >= max(DEFAULT_INTERVAL_S, _WRITE_SHARE * self._write_seconds)
            if not due and sums.batches != total:
                return
            write_checkpoint(path, sums, facts)
            self._last = time.monotonic()
            self._write_seconds = self._last - now

        return start, save
