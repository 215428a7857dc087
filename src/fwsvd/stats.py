"""Statistics that methods need from calibration data, collected through hooks.

Everything collected lives in a :class:`Statistics` object keyed by module name, never on the
modules. Hooks are removed through their handles in ``finally`` blocks, and the model's training
mode, ``requires_grad`` flags and gradients are put back as they were found.

Kinds of statistics (a method names the ones it needs):

``fisher``
    Empirical Fisher information of the task loss: squared gradients of each targeted weight,
    accumulated per calibration batch, kept reduced to one value per output feature
    (``fisher_out``) and per input feature (``fisher_in``), so one pass serves both reductions.
    ``keep_full_fisher=True`` also keeps the elementwise ``[out, in]`` sum (``fisher_full``).
``act``
    Mean absolute input activation per input feature (``act_abs_mean``), over non-padding tokens.
``cov``
    Input covariance ``X^T X`` (``cov``, float64) over non-padding tokens. Modules that read the very
    same input tensor (q/k/v, gate/up) share one matrix.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .errors import FwsvdError
from .nn import Conv1D, linear_weight

logger = logging.getLogger(__name__)

__all__ = ["STAT_KINDS", "Statistics", "collect_statistics"]

STAT_KINDS = frozenset({"fisher", "act", "cov"})
#: The tensors each kind of statistic leaves per module.
STAT_KEYS = {"fisher": ("fisher_out", "fisher_in"), "act": ("act_abs_mean",), "cov": ("cov",)}
_FORMAT = "fwsvd-statistics/1"


@dataclass
class Statistics:
    """Calibration statistics keyed by module name.

    Attributes:
        tensors: ``{module name: {statistic name: tensor}}``.
        shared: ``{module name: owner module name}`` for modules whose covariance is stored under
            another module that reads the same input.
        summary: what the statistics were computed from (source, samples, tokens, batches, kinds,
            seconds); recorded in the compressed model's config.
    """

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def for_module(self, name: str) -> dict[str, torch.Tensor]:
        """All statistics of one module, with a shared covariance resolved to its owner's."""
        stats = dict(self.tensors.get(name, {}))
        owner = self.shared.get(name)
        if owner is not None and "cov" in self.tensors.get(owner, {}):
            stats.setdefault("cov", self.tensors[owner]["cov"])
        return stats

    def uncovered(self, names: Iterable[str], kinds: Iterable[str]) -> list[str]:
        """Modules among ``names`` that lack a statistic of ``kinds`` (e.g. other --include patterns)."""
        keys = [key for kind in kinds for key in STAT_KEYS[kind]]
        return [n for n in names if any(key not in self.for_module(n) for key in keys)]

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(self.summary.get("kinds", ()))

    def save(self, path: str | Path) -> None:
        """Write to one safetensors file (tensors plus JSON metadata); no pickle involved."""
        flat = {f"{name}::{key}": t.contiguous() for name, stats in self.tensors.items() for key, t in stats.items()}
        meta = {"format": _FORMAT, "shared": json.dumps(self.shared), "summary": json.dumps(self.summary)}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(flat, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Statistics:
        """Read a file written by :meth:`save`.

        Raises:
            FwsvdError: when the file is missing or is not an fwsvd statistics file.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FwsvdError(f"statistics file {path} does not exist: run a calibration with --save-stats first")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise FwsvdError(f"{path} is not an fwsvd statistics file (format {meta.get('format')!r})")
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in load_file(str(path)).items():
            name, _, stat = key.rpartition("::")
            tensors.setdefault(name, {})[stat] = t
        return cls(tensors, json.loads(meta["shared"]), json.loads(meta["summary"]))


def _token_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``x`` (flattened to ``[tokens, features]``) that belong to real, non-padding tokens."""
    if mask is not None and x.shape[:-1] == mask.shape:
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


class _ActivationHooks:
    """Forward pre-hooks that accumulate ``act`` and ``cov`` for the targeted modules."""

    def __init__(self, model: nn.Module, names: list[str], kinds: frozenset[str]) -> None:
        self.model = model
        self.names = names
        self.want_act = "act" in kinds
        self.want_cov = "cov" in kinds
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.cov: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.shared: dict[str, str] = {}
        self.mask: torch.Tensor | None = None
        # Inputs seen in the current batch: id -> (weak reference, owner module). The weak reference
        # guards against a freed tensor's id being reused by a different tensor.
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _ActivationHooks:
        for name in self.names:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def new_batch(self, mask: torch.Tensor | None) -> None:
        self.mask = mask
        self._seen.clear()

    def entries(self, name: str) -> dict[str, torch.Tensor]:
        """The ``act_abs_mean`` and ``cov`` collected for ``name`` (those it has)."""
        entry: dict[str, torch.Tensor] = {}
        if name in self.abs_sum:
            entry["act_abs_mean"] = self.abs_sum[name] / max(self.tokens[name], 1)
        if name in self.cov:
            entry["cov"] = self.cov[name]
        return entry

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            rows = _token_mask(x, self.mask).float()
            if self.want_act:
                total = rows.abs().sum(dim=0)
                self.abs_sum[name] = self.abs_sum[name] + total if name in self.abs_sum else total
                self.tokens[name] = self.tokens.get(name, 0) + rows.shape[0]
            if self.want_cov:
                seen = self._seen.get(id(args[0]))
                if seen is not None and seen[0]() is args[0]:
                    owner = seen[1]
                    if owner != name:
                        self.shared[name] = owner
                        return
                self._seen[id(args[0])] = (weakref.ref(args[0]), name)
                # Accumulate in float64: sums over many tokens lose precision in float32.
                rows64 = rows.double()
                xtx = rows64.T @ rows64
                self.cov[name] = self.cov[name] + xtx if name in self.cov else xtx

        return hook


def collect_statistics(
    model: nn.Module,
    target_names: Iterable[str],
    batches: Iterable[Mapping[str, torch.Tensor]],
    kinds: Iterable[str],
    *,
    keep_full_fisher: bool = False,
    total: int | None = None,
    progress: bool = True,
    summary: Mapping[str, Any] | None = None,
) -> Statistics:
    """Run the calibration batches once and collect every statistic asked for.

    Args:
        model: the model; it is left as it was found (mode, ``requires_grad``, gradients).
        target_names: names of the linear modules to collect for.
        batches: model inputs; for ``fisher`` each batch carries ``labels`` so that the model
            returns its task loss.
        kinds: subset of :data:`STAT_KINDS`.
        keep_full_fisher: also keep the elementwise Fisher (``[out, in]`` per module; memory heavy).
        total: number of batches, for the progress bar.
        progress: show a tqdm bar.
        summary: extra facts recorded in :attr:`Statistics.summary` (source, samples, ...).

    Returns:
        The collected :class:`Statistics`.

    Raises:
        FwsvdError: when there is no batch, a batch lacks labels for Fisher, or the loss or a
            statistic is not finite.
    """
    kinds = frozenset(kinds)
    unknown = kinds - STAT_KINDS
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(STAT_KINDS)}")
    names = list(target_names)
    want_fisher = "fisher" in kinds
    modules = {n: model.get_submodule(n) for n in names}
    params = {n: _weight_param(m) for n, m in modules.items()}

    modes = {m: m.training for m in model.modules()}
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    saved_grads = {p: p.grad for p in model.parameters()}
    fisher_out: dict[str, torch.Tensor] = {}
    fisher_in: dict[str, torch.Tensor] = {}
    fisher_full: dict[str, torch.Tensor] = {}
    n_batches = 0
    n_rows = 0
    n_tokens = 0
    loss_sum = 0.0
    start = time.perf_counter()
    model.eval()  # deterministic statistics: no dropout
    try:
        if want_fisher:
            # Gradients only for the targeted weights: activations still carry gradient, but no
            # memory is spent on embeddings, norms or heads.
            for p in model.parameters():
                p.requires_grad_(False)
                p.grad = None
            for p in params.values():
                p.requires_grad_(True)
        with _ActivationHooks(model, names, kinds & {"act", "cov"}) as hooks:
            bar = tqdm(batches, total=total, desc="calibrating", unit="batch", disable=not progress, leave=False)
            for batch in bar:
                mask = batch.get("attention_mask")
                hooks.new_batch(mask)
                n_batches += 1
                n_rows += int(batch["input_ids"].shape[0])
                n_tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
                if want_fisher:
                    if "labels" not in batch:
                        raise FwsvdError("Fisher calibration needs labelled data: the batch has no 'labels'")
                    with torch.enable_grad():
                        loss = model(**batch).loss
                        if loss is None or not torch.isfinite(loss):
                            raise FwsvdError(f"calibration loss is {loss}: check the labels and the model weights for NaN/inf")
                        loss.backward()
                    loss_value = loss.item()
                    loss_sum += loss_value
                    bar.set_postfix(loss=f"{loss_value:.4f}")
                    for n, p in params.items():
                        g2 = _as_out_in(modules[n], p.grad).float().square()
                        p.grad = None
                        fisher_out[n] = fisher_out[n] + g2.sum(1) if n in fisher_out else g2.sum(1)
                        fisher_in[n] = fisher_in[n] + g2.sum(0) if n in fisher_in else g2.sum(0)
                        if keep_full_fisher:
                            fisher_full[n] = fisher_full[n] + g2 if n in fisher_full else g2
                else:
                    with torch.no_grad():
                        model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
            p.grad = saved_grads[p]

    if n_batches == 0:
        raise FwsvdError("no calibration batches: the calibration data is empty; pass a file with at least one example")

    stats = Statistics()
    for n in names:
        entry: dict[str, torch.Tensor] = {}
        if want_fisher:
            entry["fisher_out"] = fisher_out[n]
            entry["fisher_in"] = fisher_in[n]
            if keep_full_fisher:
                entry["fisher_full"] = fisher_full[n]
        entry.update(hooks.entries(n))
        for key, t in entry.items():
            if not torch.isfinite(t).all():
                raise FwsvdError(f"statistic {key} of {n} is not finite: the model or data produce NaN/inf")
        stats.tensors[n] = entry
    stats.shared = dict(hooks.shared)
    stats.summary = {
        **dict(summary or {}),
        "kinds": sorted(kinds),
        "batches": n_batches,
        "samples": n_rows,
        "tokens": n_tokens,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if want_fisher:
        stats.summary["mean_loss"] = loss_sum / n_batches
    logger.info("calibrated %s on %d samples (%d tokens) in %.1f s", sorted(kinds), n_rows, n_tokens, stats.summary["seconds"])
    return stats


def _weight_param(module: nn.Module) -> nn.Parameter:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise FwsvdError(f"{type(module).__name__} has no weight parameter to calibrate")
    return weight


def _as_out_in(module: nn.Module, grad: torch.Tensor | None) -> torch.Tensor:
    """A weight gradient in ``[out, in]`` layout (``Conv1D`` stores ``[in, out]``)."""
    if grad is None:
        # A module the loss does not reach (e.g. an unused layer) carries no information.
        w = linear_weight(module)
        return torch.zeros_like(w)
    return grad.t() if isinstance(module, Conv1D) else grad
