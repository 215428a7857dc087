"""Task examples: sentence(-pair) classification and regression, and token classification.

Columns are detected by name (case-insensitively) unless given explicitly. The detected layout
(:attr:`Examples.layout`) lets callers pick the task's headline metric (MCC for CoLA, F1 for
MRPC/QQP, Pearson for STS-B, accuracy otherwise).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .labels import parse_label
from .readers import Table, choose_columns, looks_like_file, read_hub, read_json, read_table

logger = logging.getLogger(__name__)

__all__ = ["Examples", "TokenExamples", "read_labelled", "read_token_labelled"]


@dataclass
class Examples:
    """Texts (and optional second texts) with their raw labels, as read from a file or the hub.

    Attributes:
        texts: The first text column.
        text_pairs: The second text column for pair tasks, else ``None``.
        labels: Raw labels as read: ``int`` for integer-looking values, ``float`` for
            decimal-looking ones, ``str`` otherwise; ``None`` when the data has no label column
            (e.g. GLUE ``test.tsv``). Turn them into model targets with :func:`fwsvd.data.label_mapping`.
        text_columns: Names of the text column(s) used (``("sentence",)`` for headerless CoLA).
        label_column: Name of the label column used, or ``None``.
        layout: Short tag of the detected layout: ``"single"``, ``"pair"``, or a GLUE task whose
            layout is distinctive: ``"cola"`` (headerless raw CoLA), ``"mrpc"``, ``"qqp"``,
            ``"stsb"``, ``"mnli"``, ``"qnli"``. Used to choose the headline metric.
        source: The path or hub name read.
    """

    texts: list[str]
    text_pairs: list[str] | None
    labels: list | None
    text_columns: tuple[str, ...]
    label_column: str | None
    layout: str
    source: str

    def __len__(self) -> int:
        return len(self.texts)


# ---------------------------------------------------------------------------------------------
# Reading labelled data
# ---------------------------------------------------------------------------------------------


def read_labelled(
    path: str | os.PathLike,
    *,
    text_column: str | None = None,
    pair_column: str | None = None,
    label_column: str | None = None,
    limit: int | None = None,
    split: str = "train",
) -> Examples:
    """Read labelled (or unlabelled) text examples from a local file or a hub dataset.

    Columns are detected by name unless given. An explicit ``text_column`` is used as a single
    text unless ``pair_column`` is given too; an explicit ``pair_column`` alone is paired with the
    detected text column. Rows whose label is empty (or ``"-"``) are skipped and counted in the
    log; rows with a different number of fields than the header are skipped with a warning.

    Args:
        path: A ``.tsv``, ``.csv``, ``.jsonl`` or ``.json`` file, or a Hugging Face hub dataset
            name, optionally with a configuration as ``"name:config"`` (e.g. ``"glue:sst2"``).
        text_column: Name of the (first) text column; detected when ``None``.
        pair_column: Name of the second text column for pair tasks; detected when ``None``.
        label_column: Name of the label column; detected when ``None`` (and absent if no column
            has a known label name).
        limit: Keep only the first ``limit`` usable rows.
        split: Split to load for hub datasets; ignored for local files.

    Returns:
        The examples, with the columns and layout that were used.

    Raises:
        DataError: If the file is missing, empty, malformed or in an unsupported format; if a
            named column does not exist or no text column can be found; if the hub dataset
            cannot be loaded; if ``limit`` is not positive.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer, got {limit!r}: pass a number of rows ≥ 1")
    table, hub_layout = read_table(path, split)
    return _examples_from_table(
        table,
        text_column=text_column,
        pair_column=pair_column,
        label_column=label_column,
        limit=limit,
        layout_hint=hub_layout,
    )


def _examples_from_table(
    table: Table,
    *,
    text_column: str | None,
    pair_column: str | None,
    label_column: str | None,
    limit: int | None,
    layout_hint: str | None,
) -> Examples:
    try:
        text_idx, pair_idx, label_idx = choose_columns(table, text_column, pair_column, label_column)
        texts, pairs, labels = _collect(table, text_idx, pair_idx, label_idx, limit)
    finally:
        if table.handle is not None:
            table.handle.close()

    columns = table.columns
    text_names = (columns[text_idx],) if pair_idx is None else (columns[text_idx], columns[pair_idx])
    label_name = columns[label_idx] if label_idx is not None and labels is not None else None
    layout = layout_hint or _layout(table, text_names, label_name)
    logger.info(
        "read %d examples from %s (layout %s, text %s, label %s)",
        len(texts),
        table.source,
        layout,
        " + ".join(text_names),
        label_name or "none",
    )
    return Examples(
        texts=texts,
        text_pairs=pairs,
        labels=labels,
        text_columns=text_names,
        label_column=label_name,
        layout=layout,
        source=table.source,
    )


def _collect(
    table: Table, text_idx: int, pair_idx: int | None, label_idx: int | None, limit: int | None
) -> tuple[list[str], list[str] | None, list | None]:
    texts: list[str] = []
    pairs: list[str] | None = [] if pair_idx is not None else None
    labels: list | None = [] if label_idx is not None else None
    # Rows without a label, kept only until a labelled row shows up: a label column that is empty
    # throughout (a test split) means unlabelled data, not an error.
    unlabelled_rows: list[tuple[str, str | None]] = []
    missing_id = -1 if label_idx is not None and table.columns[label_idx] in table.class_label_columns else None
    malformed = unlabelled = total = 0
    for row in table.rows:
        total += 1
        if table.width is not None and len(row) != table.width:
            malformed += 1
            continue
        text = row[text_idx]
        pair = row[pair_idx] if pair_idx is not None else None
        if text is None or (pair_idx is not None and pair is None):  # a JSON object without the key
            malformed += 1
            continue
        text = text if isinstance(text, str) else str(text)
        if pair is not None and not isinstance(pair, str):
            pair = str(pair)
        if label_idx is not None:
            label = parse_label(row[label_idx])
            if label is None or (missing_id is not None and label == missing_id):
                unlabelled += 1
                if not texts and (limit is None or len(unlabelled_rows) < limit):
                    unlabelled_rows.append((text, pair))
                continue
            unlabelled_rows.clear()
            labels.append(label)  # type: ignore[union-attr]
        texts.append(text)
        if pairs is not None:
            pairs.append(pair)  # type: ignore[arg-type]
        if limit is not None and len(texts) >= limit:
            break

    if malformed:
        expected = f"{table.width} fields" if table.width is not None else "the text column(s)"
        logger.warning("skipped %d malformed rows in %s (not %s)", malformed, table.source, expected)
    if not texts and unlabelled_rows:
        logger.warning(
            "the label column of %s is empty in every row: reading %d examples without labels",
            table.source,
            len(unlabelled_rows),
        )
        texts = [text for text, _ in unlabelled_rows]
        if pairs is not None:
            pairs = [pair for _, pair in unlabelled_rows]  # type: ignore[misc]
        return texts, pairs, None
    if unlabelled:
        logger.info("skipped %d rows without a label in %s", unlabelled, table.source)
    if not texts:
        if total == 0:
            raise DataError(f"{table.source} has no data rows: pass data with at least one example")
        raise DataError(
            f"{table.source} has no usable rows ({malformed} of {total} malformed): "
            "check the file format and the delimiter"
        )
    return texts, pairs, labels


def _layout(table: Table, text_names: tuple[str, ...], label_name: str | None) -> str:
    if table.headerless_cola:
        return "cola"
    if len(text_names) == 1:
        return "single"
    pair = tuple(name.casefold() for name in text_names)
    label = (label_name or "").casefold()
    if pair == ("#1 string", "#2 string"):
        return "mrpc"
    if pair == ("question1", "question2"):
        return "qqp"
    if pair == ("sentence1", "sentence2") and label == "score":
        return "stsb"
    if pair == ("sentence1", "sentence2") and label == "gold_label":
        return "mnli"
    if pair == ("question", "sentence"):
        return "qnli"
    return "pair"


# ---------------------------------------------------------------------------------------------
# Token classification (NER/POS style): JSON lines with a word list and one tag per word
# ---------------------------------------------------------------------------------------------

_TOKEN_COLUMNS: tuple[str, ...] = ("tokens", "words")
_TAG_COLUMNS: tuple[str, ...] = ("ner_tags", "tags", "labels", "pos_tags", "chunk_tags", "label")


@dataclass
class TokenExamples:
    """Pre-split words with one raw tag (int or str) per word."""

    tokens: list[list[str]]
    tags: list[list]
    source: str

    def __len__(self) -> int:
        return len(self.tokens)

    def subset(self, indices: Sequence[int]) -> TokenExamples:
        return TokenExamples([self.tokens[i] for i in indices], [self.tags[i] for i in indices], self.source)


def read_token_labelled(path: str | os.PathLike, *, limit: int | None = None, split: str = "train") -> TokenExamples:
    """Read token-classification data: ``.jsonl``/``.json`` records (or a hub dataset) with a word
    list (``tokens`` or ``words``) and a tag list of the same length (``ner_tags``, ``tags``,
    ``labels``, ``pos_tags``).

    Raises:
        DataError: for a missing/empty source, missing columns or tag lists of the wrong length.
    """
    source = os.fspath(path)
    file = Path(source).expanduser()
    if file.is_file():
        if file.suffix.lower() not in (".jsonl", ".json"):
            raise DataError(f"token-classification data {source} must be .jsonl or .json with 'tokens' and 'ner_tags' lists")
        table = read_json(file, source)
    elif isinstance(path, os.PathLike) or looks_like_file(source):
        raise DataError(f"data file {source} not found: check the path")
    else:
        table, _ = read_hub(source, split)
    tok_i = next((i for i, c in enumerate(table.columns) if c.lower() in _TOKEN_COLUMNS), None)
    tag_i = next((i for c in _TAG_COLUMNS for i, col in enumerate(table.columns) if col.lower() == c), None)
    if tok_i is None or tag_i is None:
        raise DataError(
            f"{source} needs a word-list column (tokens/words) and a tag-list column (ner_tags/tags/labels); "
            f"it has {', '.join(table.columns)}"
        )
    tokens: list[list[str]] = []
    tags: list[list] = []
    for number, row in enumerate(table.rows):
        words, labels = row[tok_i], row[tag_i]
        if not isinstance(words, list) or not isinstance(labels, list) or len(words) != len(labels):
            raise DataError(f"row {number} of {source} needs equally long lists of words and tags")
        if words:
            tokens.append([str(w) for w in words])
            tags.append(list(labels))
        if limit is not None and len(tokens) >= limit:
            break
    if not tokens:
        raise DataError(f"{source} has no rows: pass a file with at least one example")
    return TokenExamples(tokens, tags, source)
