"""Data-parallel calibration with torch.distributed: one code path for one process and for many.

A ``torchrun`` launch sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (and the rendezvous
address); :func:`init_from_env` reads them and joins the process group (gloo for tensors on the
CPU, NCCL for tensors on a GPU). Without them, or with ``WORLD_SIZE=1``, nothing is initialised
and every helper here is a no-op, so the single-process path needs no launcher.

Under ``torchrun``:

- every process draws the same calibration samples with the same seed, then takes a contiguous
  share of the batches (:func:`shard`);
- statistics are sums, so each process's running sums are added up with ``all_reduce``
  (:func:`reduce_sums`) before they become statistics: the result equals one process's to float
  summation tolerance;
- the per-layer decompositions are spread over the processes, balanced by their cost: each
  process computes its layers, then every layer's tensors are broadcast from the process that
  computed them (:func:`spread`), so every process ends with the same compressed model and rank
  0 alone writes it;
- failures: whenever the processes meet, they first agree on whether any of them failed
  (:func:`agree`). A process that fails calls :func:`report_failure` on its way out; the others
  learn of it at their next meeting and leave with :class:`PeerFailed`, which the command line
  turns into a silent non-zero exit. The lowest-ranked failing process prints the one error line.
  A process killed outright is noticed by ``torchrun``, which stops the others; the process
  group's timeout (:data:`TIMEOUT_ENV`) bounds any other wait.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..errors import FwsvdError
from .statistics import RunningSums

logger = logging.getLogger(__name__)

__all__ = [
    "TIMEOUT_ENV",
    "Context",
    "PeerFailed",
    "add_up",
    "agree",
    "current",
    "init_from_env",
    "launched",
    "owners",
    "reduce_sums",
    "report_failure",
    "shard",
    "shutdown",
    "spread",
]

T = TypeVar("T")

#: Environment variable: seconds a process waits for the others at a meeting before giving up.
#: Waits last as long as the slowest process's share of the work (calibration, or rank 0 writing
#: the output), so the default is generous; a dead process is noticed by ``torchrun`` long before.
TIMEOUT_ENV = "FWSVD_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 3 * 3600


class PeerFailed(FwsvdError):
    """Another process of the job failed; it reports the error, this one leaves quietly."""


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job (a single process is rank 0 of 1)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """Whether there are other processes to work with."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process prints, writes and reports (rank 0)."""
        return self.rank == 0


_context = Context()


def current() -> Context:
    """The context of this process (rank 0 of 1 unless :func:`init_from_env` joined a job)."""
    return _context


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise FwsvdError(f"environment variable {name}={value!r} is not a whole number: launch with torchrun, which sets it") from None


def launched() -> bool:
    """Whether this process was launched as one of several by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    try:
        return (_env_int("WORLD_SIZE") or 1) > 1
    except FwsvdError:
        return True  # let init_from_env report it


def env_rank() -> int:
    """This process's rank from the environment (0 when not launched by ``torchrun``), without any communication."""
    try:
        return _env_int("RANK") or 0 if launched() else 0
    except FwsvdError:
        return 0


def init_from_env() -> Context:
    """Join the ``torchrun`` job this process belongs to; a no-op for a single process.

    The backend is gloo, plus NCCL for CUDA tensors where a GPU is present (each process then
    uses GPU ``LOCAL_RANK``).

    Raises:
        FwsvdError: for inconsistent launcher variables or a bad :data:`TIMEOUT_ENV`.
    """
    global _context
    world = _env_int("WORLD_SIZE") or 1
    if world <= 1:
        _context = Context()
        return _context
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None or not 0 <= rank < world:
        raise FwsvdError(f"RANK={rank} does not fit WORLD_SIZE={world}: launch with torchrun, which sets both")
    local_rank = rank if local_rank is None else local_rank
    timeout = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(timeout)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise FwsvdError(f"{TIMEOUT_ENV}={timeout!r} must be a positive number of seconds")
    import torch.distributed as dist

    if not dist.is_available():  # pragma: no cover - every supported torch build has it
        raise FwsvdError("this torch build has no torch.distributed: run fwsvd without torchrun")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    _context = Context(world_size=dist.get_world_size(), rank=dist.get_rank(), local_rank=local_rank)
    logger.debug("joined a job of %d processes as rank %d (%s)", _context.world_size, _context.rank, backend)
    return _context


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    global _context
    if _context.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _context = Context()


def agree(failed: bool = False) -> int | None:
    """Meet the other processes and learn whether any of them failed.

    Every process of the job must call this at the same points (after each stretch of work of
    its own), or :func:`report_failure` on its way out of a failure.

    Returns:
        The lowest failing rank, or ``None`` when none failed.

    Raises:
        PeerFailed: when another process failed and this one did not.
    """
    ctx = current()
    if not ctx.active:
        return None
    import torch.distributed as dist

    # MAX over (world - rank) of the failing processes: the lowest failing rank wins.
    flag = torch.tensor([ctx.world_size - ctx.rank if failed else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    lowest = None if int(flag) == 0 else ctx.world_size - int(flag)
    if lowest is not None and not failed:
        raise PeerFailed(f"process {lowest} of the job failed")
    return lowest


def report_failure() -> bool:
    """Tell the other processes that this one failed; whether this process should print the error.

    Only the lowest-ranked failing process prints, so an error that every process meets (bad
    data, say) is printed once. When the others cannot be reached, this process prints.
    """
    ctx = current()
    if not ctx.active:
        return True
    try:
        lowest = agree(failed=True)
    except Exception:  # noqa: BLE001 - the job is already failing: the only question is who prints
        return True
    return lowest == ctx.rank


def shard(items: Sequence[T]) -> list[T]:
    """This process's contiguous share of ``items`` (all of them for a single process).

    Raises:
        FwsvdError: when there are fewer items than processes (a process would have nothing).
    """
    ctx = current()
    if not ctx.active:
        return list(items)
    n = len(items)
    if n < ctx.world_size:
        raise FwsvdError(
            f"{n} calibration batches for {ctx.world_size} processes: every process needs one; "
            "pass more --samples, a smaller --batch-size, or fewer processes"
        )
    return list(items[ctx.rank * n // ctx.world_size : (ctx.rank + 1) * n // ctx.world_size])


def add_up(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each of ``tensors`` over the processes, in place (nothing for a single process).

    Every process must pass tensors of the same shapes and dtypes in the same order (those of one
    transformer block, in streamed calibration). GPU tensors travel through NCCL, CPU ones through gloo.

    Raises:
        PeerFailed: when another process failed before reaching this point.
    """
    ctx = current()
    if not ctx.active:
        return
    import torch.distributed as dist

    agree()
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def _layout(sums: RunningSums) -> int:
    """A 63-bit digest of which tensors ``sums`` holds (names, shapes, dtypes) and of its shared map."""
    layout = {
        "tensors": sorted((name, key, list(t.shape), str(t.dtype)) for name, entry in sums.tensors.items() for key, t in entry.items()),
        "shared": sorted(sums.shared.items()),
    }
    digest = hashlib.sha256(json.dumps(layout).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def reduce_sums(sums: RunningSums) -> RunningSums:
    """Add up the running sums of every process; every process gets the total (in place).

    Raises:
        FwsvdError: when the processes collected different sets of statistics.
        PeerFailed: when another process failed before reaching this point.
    """
    ctx = current()
    if not ctx.active:
        return sums
    import torch.distributed as dist

    agree()
    layout = torch.tensor([_layout(sums), -_layout(sums)], dtype=torch.int64)
    dist.all_reduce(layout, op=dist.ReduceOp.MAX)
    if int(layout[0]) != -int(layout[1]):
        raise FwsvdError("the processes collected different statistics (another model or data on some of them?): run every process on the same files")
    for name in sorted(sums.tensors):
        for key in sorted(sums.tensors[name]):
            dist.all_reduce(sums.tensors[name][key], op=dist.ReduceOp.SUM)
    counts = torch.tensor([sums.batches, sums.samples, sums.tokens, sums.loss_sum], dtype=torch.float64)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    batches, samples, tokens, loss_sum = counts.tolist()
    return RunningSums(sums.tensors, sums.shared, int(batches), int(samples), int(tokens), loss_sum)


def owners(costs: Sequence[float], world_size: int) -> list[int]:
    """The process that computes each item: longest first, each to the least loaded process.

    Deterministic (ties go to the lowest rank), so every process computes the same assignment.
    """
    load = [0.0] * world_size
    owner = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += costs[index]
    return owner


def spread(
    items: Sequence[T],
    compute: Callable[[T], list[torch.Tensor]],
    like: Callable[[T], list[tuple[tuple[int, ...], torch.dtype]]],
    cost: Callable[[T], float] | None = None,
) -> Iterator[tuple[T, list[torch.Tensor]]]:
    """``compute(item)`` for every item, each computed by one process and handed to all, in order.

    A single process computes the items one at a time as they are consumed, exactly as a plain
    loop would. Under ``torchrun`` the items are shared out by :func:`owners` (balanced by
    ``cost``), every process computes all of its own first (holding its share of the results),
    and then each result is broadcast from its owner, in the order of ``items``.

    Args:
        items: the work, in the same order on every process.
        compute: the tensors of one item (on the process that owns it).
        like: the ``(shape, dtype)`` of each tensor ``compute`` returns for an item, known to
            every process beforehand (the receivers allocate them).
        cost: relative cost of an item (e.g. its flops), the same on every process; equal when
            omitted. Calls with the same items and costs assign each item to the same process.

    Yields:
        ``(item, tensors)`` in the order of ``items``.

    Raises:
        PeerFailed: when another process failed.
    """
    ctx = current()
    if not ctx.active:
        for item in items:
            yield item, compute(item)
        return
    import torch.distributed as dist

    owner = owners([cost(item) if cost is not None else 1.0 for item in items], ctx.world_size)
    mine: dict[int, list[torch.Tensor]] = {}
    for index, item in enumerate(items):
        if owner[index] == ctx.rank:
            tensors = [t.contiguous() for t in compute(item)]
            expected = [(tuple(shape), dtype) for shape, dtype in like(item)]
            if [(tuple(t.shape), t.dtype) for t in tensors] != expected:
                raise FwsvdError(f"internal error: computed tensors {[(tuple(t.shape), t.dtype) for t in tensors]} differ from the announced {expected}")
            mine[index] = tensors
    agree()
    # NCCL (on GPUs) broadcasts GPU tensors only: every process sends and receives on its own GPU.
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    for index, item in enumerate(items):
        if owner[index] == ctx.rank:
            tensors = [t.to(device) for t in mine.pop(index)]
        else:
            tensors = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in like(item)]
        for t in tensors:
            dist.broadcast(t, src=owner[index])
        yield item, tensors
