"""Tokenizing and batching: encoded examples, causal LM blocks, padded tensor batches.

No model code lives here: tokenizers are passed in by the caller.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..errors import DataError
from .labels import label_mapping
from .tasks import Examples, TokenExamples

__all__ = ["batches", "causal_blocks", "encode_examples", "encode_token_examples"]


def _check_positive(value: Any, name: str, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}: {fix}")


def encode_examples(tokenizer: Any, examples: Examples, max_length: int) -> list[dict[str, list[int]]]:
    """Tokenize examples (as pairs when ``examples.text_pairs`` is set), truncated, unpadded.

    Args:
        tokenizer: A Hugging Face tokenizer.
        examples: The examples to encode.
        max_length: Maximum number of tokens per example, special tokens included.

    Returns:
        One dict per example with ``input_ids``, ``attention_mask`` and, when the tokenizer
        produces them, ``token_type_ids``.

    Raises:
        DataError: If ``max_length`` is not a positive integer, or the pair column has a
            different length than the texts.
    """
    _check_positive(max_length, "max_length", "pass --max-length ≥ 1")
    if not examples.texts:
        return []
    if examples.text_pairs is not None and len(examples.text_pairs) != len(examples.texts):
        raise DataError(
            f"{examples.source} has {len(examples.texts)} texts but {len(examples.text_pairs)} "
            "second texts: give both columns for every example"
        )
    encoded = tokenizer(
        examples.texts,
        examples.text_pairs,
        truncation=True,
        max_length=max_length,
        padding=False,
    )
    input_ids = encoded["input_ids"]
    attention = encoded.get("attention_mask")
    token_types = encoded.get("token_type_ids")
    items: list[dict[str, list[int]]] = []
    for index, ids in enumerate(input_ids):
        item = {
            "input_ids": list(ids),
            "attention_mask": list(attention[index]) if attention is not None else [1] * len(ids),
        }
        if token_types is not None:
            item["token_type_ids"] = list(token_types[index])
        items.append(item)
    return items


def draw(n: int, k: int, seed: int) -> list[int]:
    """``k`` of ``range(n)`` drawn without replacement with ``random.Random(seed)``, in their original order (all when ``k >= n``)."""
    if k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


def causal_blocks(
    tokenizer: Any,
    text: str,
    block_length: int,
    *,
    limit: int | None = None,
    samples: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Cut a text into non-overlapping blocks of tokens for causal language models.

    The whole text is tokenized once without special tokens; the tail that does not fill a block
    is dropped.

    Args:
        tokenizer: A Hugging Face tokenizer.
        text: The text, e.g. from :func:`fwsvd.data.read_text`.
        block_length: Tokens per block.
        limit: Keep only the first ``limit`` blocks.
        samples: Then draw this many blocks without replacement (all of them if there are
            fewer), with ``random.Random(seed)``, keeping their original order.
        seed: Seed for ``samples``.

    Returns:
        A ``torch.long`` tensor of shape ``[n_blocks, block_length]``.

    Raises:
        DataError: If ``block_length``, ``limit`` or ``samples`` is not positive, or the text
            yields no full block.
    """
    _check_positive(block_length, "block_length", "pass --max-length ≥ 1")
    if limit is not None:
        _check_positive(limit, "limit", "pass a number of blocks ≥ 1")
    if samples is not None:
        _check_positive(samples, "samples", "pass a number of blocks ≥ 1")
    # verbose=False: the whole text is far longer than model_max_length, which is expected here.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n_blocks = len(ids) // block_length
    if n_blocks == 0:
        raise DataError(
            f"the text has {len(ids)} tokens, fewer than one block of {block_length}: "
            "lower --max-length or give more text"
        )
    if limit is not None:
        n_blocks = min(n_blocks, limit)
    starts = range(n_blocks) if samples is None else draw(n_blocks, samples, seed)
    blocks = torch.tensor(ids[: n_blocks * block_length], dtype=torch.long).view(n_blocks, block_length)
    if len(starts) != n_blocks:
        blocks = blocks[torch.tensor(list(starts), dtype=torch.long)]
    return blocks


def batches(
    items: list[dict],
    batch_size: int,
    pad_token_id: int,
    labels: list | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Group encoded examples into right-padded tensor batches, in order.

    Each batch is padded to its own longest item: ``input_ids`` with ``pad_token_id``,
    ``attention_mask``, ``token_type_ids`` and any other key with 0.

    Args:
        items: Encoded examples, as from :func:`encode_examples`.
        batch_size: Examples per batch (the last batch may be smaller).
        pad_token_id: Token id used to pad ``input_ids``.
        labels: Targets aligned with ``items``, as from :func:`fwsvd.data.label_mapping`; added as a
            ``labels`` tensor (long for ints, float for floats).

    Yields:
        Dicts of tensors of shape ``[batch, longest]`` (``labels``: ``[batch]``).

    Raises:
        DataError: If ``batch_size`` is not positive, ``pad_token_id`` is None, or ``labels``
            does not match ``items`` in length.
    """
    _check_positive(batch_size, "batch_size", "pass --batch-size ≥ 1")
    if pad_token_id is None:
        raise DataError("pad_token_id is None: set the tokenizer's pad token (e.g. to its eos token)")
    if labels is not None and len(labels) != len(items):
        raise DataError(f"got {len(labels)} labels for {len(items)} examples: pass one label per example")
    label_dtype = torch.long
    per_token = labels is not None and any(isinstance(value, (list, tuple)) for value in labels)
    if labels is not None and not per_token and any(isinstance(value, float) for value in labels):
        label_dtype = torch.float32
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        longest = max(len(item["input_ids"]) for item in chunk)
        batch: dict[str, torch.Tensor] = {}
        keys = list(chunk[0])
        if "attention_mask" not in keys:
            keys.append("attention_mask")
        for key in keys:
            fill = pad_token_id if key == "input_ids" else 0
            rows = []
            for item in chunk:
                values = item[key] if key in item else [1] * len(item["input_ids"])
                rows.append(list(values) + [fill] * (longest - len(values)))
            batch[key] = torch.tensor(rows, dtype=torch.long)
        if per_token:
            # Token labels are padded with -100, the index the loss ignores.
            rows = [list(row) + [-100] * (longest - len(row)) for row in labels[start : start + batch_size]]
            batch["labels"] = torch.tensor(rows, dtype=torch.long)
        elif labels is not None:
            batch["labels"] = torch.tensor(labels[start : start + batch_size], dtype=label_dtype)
        yield batch


def encode_token_examples(
    tokenizer: Any,
    examples: TokenExamples,
    max_length: int,
    *,
    num_labels: int | None = None,
    label2id: Mapping[str, int] | None = None,
) -> tuple[list[dict[str, list[int]]], list[list[int]]]:
    """Tokenize word lists and align tags to the first sub-token of each word (others get -100).

    Returns:
        ``(items, targets)``: encoded examples and per-token targets.

    Raises:
        DataError: for tags outside the model's classes.
    """
    _check_positive(max_length, "max_length", "pass --max-length ≥ 1")
    flat = [tag for row in examples.tags for tag in row]
    ids, _, used = label_mapping(flat, label2id=label2id, num_labels=num_labels, regression=False, source=examples.source)
    encoded = tokenizer(examples.tokens, is_split_into_words=True, truncation=True, max_length=max_length, padding=False)
    items: list[dict[str, list[int]]] = []
    targets: list[list[int]] = []
    offset = 0
    for index, row in enumerate(examples.tags):
        row_ids = ids[offset : offset + len(row)]
        offset += len(row)
        word_ids = encoded.word_ids(index)
        target, previous = [], None
        for word in word_ids:
            target.append(row_ids[word] if word is not None and word != previous else -100)
            previous = word
        item = {k: list(v[index]) for k, v in encoded.items()}
        items.append(item)
        targets.append(target)
    return items, targets
