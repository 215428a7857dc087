"""Tokenizing and batching: encoded examples, causal LM blocks, padded tensor batches.

No model code lives here: tokenizers are passed in by the caller.
"""

from __future__ import annotations

import logging
import os
import random
import re
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from contextlib import closing, nullcontext
from typing import Any

import torch

from ..errors import DataError
from .labels import label_mapping
from .readers import read_text, text_chunks
from .tasks import Examples, TokenExamples

logger = logging.getLogger(__name__)

__all__ = ["CHUNK_CHARS", "batches", "causal_blocks", "causal_blocks_from_file", "encode_examples", "encode_token_examples"]

# Characters read and tokenized at a time by causal_blocks_from_file. Tokenizing costs about
# 150 bytes of memory per character (the tokenizer's encoding, the ids and offsets as Python
# lists), and two windows' tokens are held while they are stitched: about 70 MB at 256 Ki
# characters, whatever the size of the file.
CHUNK_CHARS = 1 << 18
# Characters two neighbouring windows share at first; doubled while no place to stitch is found.
_OVERLAP_CHARS = 1 << 13
# Tokens that must agree, in id and offsets, after a stitching point in both windows: a check
# beyond the word-start rule, for tokenizers that do not split at whitespace first.
_AGREE = 4
# A whitespace character and the first character of a word: pre-tokenizers split there.
_WORD_START = re.compile(r"\s\S")
# A window that grows past this (no stitching point in a run of text this long) is refused.
_MAX_WINDOW_CHARS = 1 << 26


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


def draw_outside(n: int, taken: Iterable[int], k: int, seed: int) -> list[int]:
    """Up to ``k`` of ``range(n)`` outside ``taken``, drawn without replacement with ``random.Random(seed)``, in
    their original order (empty when ``taken`` holds every index): held-out blocks beside a calibration draw."""
    skip = set(taken)
    rest = [i for i in range(n) if i not in skip]
    return sorted(random.Random(seed).sample(rest, min(k, len(rest))))


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


def causal_blocks_from_file(
    tokenizer: Any,
    path: str | os.PathLike,
    block_length: int,
    *,
    limit: int | None = None,
    samples: int | None = None,
    seed: int = 0,
    chunk_chars: int = CHUNK_CHARS,
) -> torch.Tensor:
    """:func:`causal_blocks` of a text file, read and tokenized piece by piece in bounded memory.

    The result is the same tensor as ``causal_blocks(tokenizer, read_text(path), ...)``: the same
    tokens, blocks and draw. Memory does not grow with the file: one window of ``chunk_chars``
    characters is tokenized at a time, and only the blocks returned are kept. With ``samples``,
    the file is read twice: once to count the blocks (the draw needs their number), once to
    collect the drawn ones. With ``limit`` and no ``samples``, reading stops once ``limit``
    blocks are full (a bad byte further on then goes unnoticed).

    How the pieces are joined: consecutive windows overlap, and each is tokenized on its own with
    character offsets. A window's tokens can differ from the whole text's only within the word or
    whitespace run its cut falls in (and the word after its start, for an added prefix space or
    ``▁``), so two windows are stitched at a character between the first word start after the
    later window's start and the last word start before the earlier one's end, where both have a
    token boundary and the next few tokens agree in id and offsets, nearest the middle of the
    overlap. Where there is none, the overlap is doubled, then the window grows until there is
    one. This holds for tokenizers that split text at whitespace before tokenizing it (byte-level
    BPE, WordPiece, Metaspace/SentencePiece-style); for others the agreement of the tokens is the
    check. A stretch of more than 64 Mi characters without whitespace is refused; windows end at
    line ends where possible.

    Tokenizers without character offsets (Python "slow" tokenizers) read the whole text as
    :func:`causal_blocks` does.

    Args:
        tokenizer: A Hugging Face tokenizer, preferably a fast one.
        path: The plain UTF-8 ``.txt`` file.
        block_length: Tokens per block.
        limit: Keep only the first ``limit`` blocks.
        samples: Then draw this many blocks without replacement (all of them if there are
            fewer), with ``random.Random(seed)``, keeping their original order.
        seed: Seed for ``samples``.
        chunk_chars: Characters read and tokenized at a time; memory scales with it.

    Returns:
        A ``torch.long`` tensor of shape ``[n_blocks, block_length]``.

    Raises:
        DataError: If ``block_length``, ``limit``, ``samples`` or ``chunk_chars`` is not
            positive; the file is missing, not UTF-8, binary or empty; or it yields no full block.
    """
    _check_positive(block_length, "block_length", "pass --max-length ≥ 1")
    if limit is not None:
        _check_positive(limit, "limit", "pass a number of blocks ≥ 1")
    if samples is not None:
        _check_positive(samples, "samples", "pass a number of blocks ≥ 1")
    _check_positive(chunk_chars, "chunk_chars", "pass a number of characters ≥ 1")
    if not getattr(tokenizer, "is_fast", False):
        # Stitching needs character offsets, which only fast (Rust) tokenizers give.
        logger.info("%s is not a fast tokenizer: reading %s whole", type(tokenizer).__name__, os.fspath(path))
        return causal_blocks(tokenizer, read_text(path), block_length, limit=limit, samples=samples, seed=seed)
    source = os.fspath(path)

    def stream() -> Iterator[list[int]]:
        return _token_stream(tokenizer, text_chunks(path, chunk_chars), chunk_chars, source)

    cap = None if limit is None else limit * block_length
    if samples is None:
        ids = _first_tokens(stream(), cap)
        n_blocks = _full_blocks(len(ids), block_length)
        # The ids stay in the array's buffer: no second copy of every block.
        return torch.frombuffer(ids, dtype=torch.long)[: n_blocks * block_length].view(n_blocks, block_length)
    n_blocks = _full_blocks(_count_tokens(stream(), cap), block_length)
    return _gather_blocks(stream(), draw(n_blocks, samples, seed), block_length)


def _full_blocks(n_tokens: int, block_length: int) -> int:
    if n_tokens < block_length:
        raise DataError(
            f"the text has {n_tokens} tokens, fewer than one block of {block_length}: "
            "lower --max-length or give more text"
        )
    return n_tokens // block_length


def _first_tokens(stream: Iterator[list[int]], cap: int | None) -> array:
    """The stream's first ``cap`` ids (all without a cap), as 64-bit integers."""
    ids = array("q")
    with closing(stream):
        for piece in stream:
            ids.extend(piece if cap is None else piece[: cap - len(ids)])
            if cap is not None and len(ids) >= cap:
                break
    return ids


def _count_tokens(stream: Iterator[list[int]], cap: int | None) -> int:
    n = 0
    with closing(stream):
        for piece in stream:
            n += len(piece)
            if cap is not None and n >= cap:
                return cap
    return n


def _gather_blocks(stream: Iterator[list[int]], picked: list[int], block_length: int) -> torch.Tensor:
    """Blocks ``picked`` (ascending) of the stream, as rows of a tensor; reading stops after the last."""
    out = torch.empty(len(picked), block_length, dtype=torch.long)
    row = {block: index for index, block in enumerate(picked)}
    end = (picked[-1] + 1) * block_length
    position = 0  # ids of the stream before ``piece``
    with closing(stream):
        for piece in stream:
            stop = min(position + len(piece), end)
            block = position // block_length
            while block * block_length < stop:
                lo = max(block * block_length, position)
                hi = min((block + 1) * block_length, stop)
                if block in row:
                    out[row[block], lo - block * block_length : hi - block * block_length] = torch.tensor(
                        piece[lo - position : hi - position], dtype=torch.long
                    )
                block += 1
            position += len(piece)
            if position >= end:
                break
    return out


_Tokens = tuple[list[int], list[int], list[int]]  # ids, start and end offsets in the whole text


def _tokenize(tokenizer: Any, text: str, offset: int) -> _Tokens:
    encoded = tokenizer(
        text,
        add_special_tokens=False,
        verbose=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    offsets = encoded["offset_mapping"]
    return encoded["input_ids"], [start + offset for start, _ in offsets], [end + offset for _, end in offsets]


def _tail(tokens: _Tokens, index: int) -> _Tokens:
    return tokens[0][index:], tokens[1][index:], tokens[2][index:]


def _stitch(before: _Tokens, after: _Tokens, lo: int, hi: int) -> tuple[int, int, int] | None:
    """Where to go from ``before``'s tokens to ``after``'s, a character in ``[lo, hi)``.

    Returns ``(i, j, at)``: both have a token starting at character ``at`` (index ``i`` in
    ``before``, ``j > 0`` in ``after``), the token before it ends at or before ``at`` in both, and the
    ``_AGREE`` tokens from there are equal in id and offsets and end by ``hi``. Of all such
    characters, the one nearest the middle of ``[lo, hi)``, farthest from where either window was
    cut. None if there is none.
    """
    ids_b, starts_b, ends_b = before
    ids_a, starts_a, ends_a = after
    mid = (lo + hi) // 2
    boundaries: dict[int, int] = {}
    for i in range(bisect_left(starts_b, lo), bisect_left(starts_b, hi)):
        at = starts_b[i]
        if (i == 0 or ends_b[i - 1] <= at) and at not in boundaries:
            boundaries[at] = i
    candidates = []
    for j in range(max(1, bisect_left(starts_a, lo)), bisect_left(starts_a, hi)):
        at = starts_a[j]
        if ends_a[j - 1] <= at and at in boundaries:
            candidates.append((abs(at - mid), at, boundaries[at], j))
    for _, at, i, j in sorted(candidates):
        k, m = slice(i, i + _AGREE), slice(j, j + _AGREE)
        if (
            i + _AGREE <= len(ids_b)
            and j + _AGREE <= len(ids_a)
            and ids_b[k] == ids_a[m]
            and starts_b[k] == starts_a[m]
            and ends_b[k] == ends_a[m]
            and max(ends_b[k]) <= hi
        ):
            return i, j, at
    return None


def _continues(window: _Tokens, tokens: _Tokens, first: int) -> bool:
    """Whether ``tokens`` has a boundary before its token ``first`` and the ``_AGREE`` tokens from
    there are ``window``'s first ones, in id and offsets."""
    if first >= len(tokens[0]) or (first > 0 and tokens[2][first - 1] > tokens[1][first]):
        return False
    return all(theirs[first : first + _AGREE] == mine[:_AGREE] for theirs, mine in zip(tokens, window))


def _sound_between(held: str, held_at: int, start: int, end: int) -> tuple[int, int]:
    """The characters ``[lo, hi)`` of an overlap ``[start, end)`` where both windows can be right.

    A window's tokens can be wrong only within the word or whitespace run that its cut falls in (and
    for an added prefix space or ``▁``, the word after its start). So the window that starts at
    ``start`` is sound from the first word start after it (the text's start has no cut), the one
    that ends at ``end`` up to the whitespace before its last word start.
    """
    first = _WORD_START.search(held, start - held_at, end - held_at) if start > 0 else None
    lo = start if start == 0 else end if first is None else held_at + first.start() + 1
    last = None
    for last in _WORD_START.finditer(held, lo - held_at, end - held_at):
        pass
    hi = lo if last is None else held_at + last.start()
    return lo, hi


def _cut(text: str, lo: int, hi: int) -> int:
    """Where to end a window in ``text[lo:hi]``: after a line end followed by a non-space if any,
    else after the last line end, else before the last space, else at ``hi``."""
    if lo >= hi:
        return hi
    last = at = text.rfind("\n", lo, hi - 1)
    for _ in range(64):
        if at < lo:
            break
        if not text[at + 1].isspace():
            return at + 1
        at = text.rfind("\n", lo, at)
    if last >= lo:
        return last + 1
    space = text.rfind(" ", lo, hi)
    return space if space > lo else hi


def _token_stream(tokenizer: Any, chunks: Iterator[str], chunk_chars: int, source: str) -> Iterator[list[int]]:
    """The ids of the whole text of ``chunks``, in pieces, tokenized window by window.

    State: ``held`` is the text from character ``held_at`` on (the current window's start) to the
    end of what was read; ``window`` holds the current window's tokens from character ``done``
    on, those before it having been yielded; the window spans ``[start, end)``.
    """
    overlap = max(1, min(_OVERLAP_CHARS, chunk_chars // 2))
    held, held_at, eof = "", 0, False

    def read_to(target: int) -> None:
        nonlocal held, eof
        parts, have = [held], held_at + len(held)
        while have < target and not eof:
            chunk = next(chunks, None)
            if chunk is None:
                eof = True
            else:
                parts.append(chunk)
                have += len(chunk)
        held = "".join(parts)

    def window_end(after: int, size: int) -> int:
        read_to(after + size)
        top = held_at + len(held)
        if eof:
            return top
        return held_at + _cut(held, after + max(1, size // 2) - held_at, top - held_at)

    with closing(chunks) if hasattr(chunks, "close") else nullcontext():  # type: ignore[attr-defined]
        start, done, size = 0, 0, chunk_chars
        end = window_end(0, size)
        window = _tokenize(tokenizer, held[:end], 0)
        while not (eof and end == held_at + len(held)):
            new_end = window_end(end, size)
            width = overlap
            while True:
                new_start = max(start, end - width)
                tokens = _tokenize(tokenizer, held[new_start - held_at : new_end - held_at], new_start)
                lo, hi = _sound_between(held, held_at, new_start, end)
                found = _stitch(window, tokens, max(lo, done), hi)
                if found is not None or new_start == start:
                    break
                width *= 2
            if found is None:
                # The new window starts where the current one did and reaches further: it replaces it.
                logger.debug("%s: no stitching point in characters %d-%d; window grows", source, done, end)
                if new_end - start > _MAX_WINDOW_CHARS:
                    raise DataError(
                        f"{source} has no place to split it for tokenization in {new_end - start:,} characters "
                        f"from character {start:,} (one word or whitespace run that long?): break it into shorter lines"
                    )
                first = bisect_left(tokens[1], done)
                if done > start and not _continues(window, tokens, first):
                    # Tokens up to ``done`` are out; the longer window must tokenize on from there as before.
                    raise DataError(
                        f"{source} cannot be tokenized in pieces near character {done:,}: the tokenizer's output there "
                        "depends on text far away; cut the file into shorter lines there"
                    )
                # Geometrically, so that a long run costs O(n log n), not O(n²).
                window, end, size = _tail(tokens, first), new_end, 2 * size
                continue
            i, j, at = found
            yield window[0][:i]
            window, done, start, end, size = _tail(tokens, j), at, new_start, new_end, chunk_chars
            held, held_at = held[start - held_at :], start
        yield window[0]


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
