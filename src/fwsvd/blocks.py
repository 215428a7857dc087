"""Transformer blocks: capture the calls of a block stack and split hidden states from the other arguments."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import FwsvdError

__all__ = ["BlockCall", "StopForward", "block_targets", "capture_block_calls", "check_single_stack", "split_hidden"]


class StopForward(Exception):
    """Raised by the capture hook to end a forward pass once the block inputs are recorded."""


@dataclass
class BlockCall:
    """How one block was called for one batch, without its hidden-states input."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    positional: bool  # hidden states came as the first positional argument (else as a keyword)

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = self.raw(block, hidden)
        # Blocks return the hidden states alone or first in a tuple, depending on the family.
        return out[0] if isinstance(out, (tuple, list)) else out

    def raw(self, block: nn.Module, hidden: torch.Tensor) -> Any:
        """The block's own return value (a tensor, or a tuple led by the hidden states)."""
        return block(hidden, *self.args, **self.kwargs) if self.positional else block(*self.args, hidden_states=hidden, **self.kwargs)


@dataclass
class _Captured:
    """Per batch: the first block's hidden-states input and the token mask; per block and batch: its call."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)
    calls: list[list[BlockCall]] = field(default_factory=list)  # [block][batch]


def split_hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, BlockCall]:
    if args:
        return args[0], BlockCall(tuple(args[1:]), dict(kwargs), positional=True)
    if "hidden_states" not in kwargs:
        raise FwsvdError("cannot find the hidden states a transformer block is called with: run without sequential mode")
    rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    return kwargs["hidden_states"], BlockCall(tuple(args), rest, positional=False)


def capture_block_calls(model: nn.Module, blocks: list[nn.Module], batches: list[dict[str, torch.Tensor]]) -> _Captured:
    """Record every block's call for every batch, stopping the forward pass at the last block.

    Every block's arguments are recorded, not only the first block's: some families hand different
    attention masks to different blocks (sliding-window layers), and reusing the first block's would
    silently change what later blocks see. Arguments shared between blocks are the same objects, so
    recording them costs no memory; only the first block's hidden states are kept.
    """
    captured = _Captured(calls=[[] for _ in blocks])
    last = len(blocks) - 1

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden, call = split_hidden(args, kwargs)
            captured.calls[index].append(call)
            if index == 0:
                captured.hidden.append(hidden.detach())
            if index == last:
                raise StopForward

        return hook

    # use_cache=False: a key/value cache would otherwise be built and handed to the blocks.
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    handles = [block.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            try:
                model(**inputs, **extra)
            except StopForward:
                pass
            else:
                raise FwsvdError("the model's forward pass did not reach its last transformer block: run without sequential mode")
            captured.masks.append(batch.get("attention_mask"))
    finally:
        for handle in handles:
            handle.remove()
    if any(len(calls) != len(batches) for calls in captured.calls):
        raise FwsvdError("some transformer blocks were not called once per batch (layer drop or early exit?): run without sequential mode")
    return captured


def block_targets(block_names: list[str], target_names: list[str], *, what: str) -> dict[str, list[str]]:
    """The targets of each block, in order; every target must lie inside a block.

    Raises:
        FwsvdError: naming the targets outside the blocks.
    """
    by_block: dict[str, list[str]] = {name: [] for name in block_names}
    outside: list[str] = []
    for target in target_names:
        owner = next((b for b in block_names if target.startswith(b + ".")), None)
        (outside if owner is None else by_block[owner]).append(target)
    if outside:
        raise FwsvdError(
            f"{what} works one transformer block at a time, but {', '.join(outside[:3])}{' ...' if len(outside) > 3 else ''} "
            f"lie outside the blocks: narrow --include, or run without {what}"
        )
    return by_block


def check_single_stack(model: nn.Module, block_names: list[str], what: str) -> None:
    """Refuse a model without transformer blocks, or with more than one chain of them.

    Each block's output must be the next block's input; an encoder-decoder's decoder starts from
    its own embeddings and reads the encoder's output through cross-attention instead.
    """
    if not block_names:
        raise FwsvdError(f"{type(model).__name__} has no repeated transformer blocks to go through one at a time: run without {what}")
    stacks = sorted({name.rpartition(".")[0] for name in block_names})
    if len(stacks) > 1:
        raise FwsvdError(
            f"{type(model).__name__} has {len(stacks)} stacks of blocks ({', '.join(stacks)}); {what} follows one chain of "
            f"blocks (decoder-only or encoder-only models): run without {what}"
        )
