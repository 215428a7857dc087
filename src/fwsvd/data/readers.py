"""Reading task data: labelled text tables, plain text for causal LMs, tokenized batches.

Local files are read by extension:

* ``.tsv`` -- GLUE layout, read with :mod:`csv` and ``quoting=csv.QUOTE_NONE`` because MNLI and
  QQP contain unbalanced quote characters inside sentences. CoLA's raw ``train.tsv``/``dev.tsv``
  have no header row and are recognised by their shape.
* ``.csv`` -- a header row, standard CSV quoting.
* ``.jsonl`` / ``.json`` -- one JSON object per line, or a JSON list of objects.

Anything else that is not an existing file is taken as a Hugging Face ``datasets`` hub name,
optionally ``"name:config"`` (e.g. ``"glue:sst2"``); ``datasets`` is imported only then.

Columns are detected by name (case-insensitively) unless given explicitly. The detected layout
(:attr:`Examples.layout`) lets callers pick the task's headline metric (MCC for CoLA, F1 for
MRPC/QQP, Pearson for STS-B, accuracy otherwise).

No model code lives here: tokenizers are passed in by the caller.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fwsvd.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "Examples",
    "TokenExamples",
    "batches",
    "causal_blocks",
    "encode_examples",
    "label_mapping",
    "encode_token_examples",
    "read_labelled",
    "read_text",
    "read_token_labelled",
]

# Column-name candidates, in order of preference. Matching is case-insensitive.
_TEXT_CANDIDATES: tuple[str, ...] = ("sentence", "text", "content", "review", "document", "question")
# Pairs are tried before single columns, so that QNLI's (question, sentence) is not read as a
# single-sentence task.
_PAIR_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("question1", "question2"),
    ("#1 String", "#2 String"),
    ("premise", "hypothesis"),
    ("text_a", "text_b"),
    ("question", "passage"),
)
_LABEL_CANDIDATES: tuple[str, ...] = (
    "label",
    "labels",
    "gold_label",
    "score",
    "Quality",
    "is_duplicate",
    "target",
    "class",
    "y",
)
# CoLA's raw train/dev.tsv: no header, these four columns.
_COLA_COLUMNS: tuple[str, ...] = ("source", "label", "original_mark", "sentence")
# Names that mark a first row as a header (used to tell headerless CoLA from a headed table).
_KNOWN_HEADER_NAMES: frozenset[str] = frozenset(
    name.lower()
    for name in (
        *_TEXT_CANDIDATES,
        *(name for pair in _PAIR_CANDIDATES for name in pair),
        *_LABEL_CANDIDATES,
        *_COLA_COLUMNS,
        "index",
        "idx",
        "id",
        "#1 ID",
        "#2 ID",
        "qid1",
        "qid2",
        "genre",
        "label1",
    )
)
# GLUE configurations whose headline metric is not accuracy, for hub names like "glue:cola".
_GLUE_LAYOUTS: frozenset[str] = frozenset({"cola", "mrpc", "qqp", "stsb", "mnli", "qnli"})

# Label cells that mean "no label": empty, and the "-" that MNLI/SNLI use when annotators disagree.
_MISSING_LABELS: frozenset[str] = frozenset({"", "-"})
_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(
    r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?|[+-]?(?:nan|inf|infinity)", re.IGNORECASE
)
_DEFAULT_LABEL_RE = re.compile(r"LABEL_\d+")

_TABLE_SUFFIXES: frozenset[str] = frozenset({".tsv", ".csv", ".jsonl", ".json"})
# A missing path with one of these suffixes is reported as a missing file, not tried on the hub.
_FILE_LIKE_SUFFIXES: frozenset[str] = _TABLE_SUFFIXES | {
    ".txt",
    ".parquet",
    ".arrow",
    ".xlsx",
    ".xls",
    ".gz",
    ".zip",
    ".ndjson",
}


@dataclass
class Examples:
    """Texts (and optional second texts) with their raw labels, as read from a file or the hub.

    Attributes:
        texts: The first text column.
        text_pairs: The second text column for pair tasks, else ``None``.
        labels: Raw labels as read: ``int`` for integer-looking values, ``float`` for
            decimal-looking ones, ``str`` otherwise; ``None`` when the data has no label column
            (e.g. GLUE ``test.tsv``). Turn them into model targets with :func:`label_mapping`.
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
    source = os.fspath(path)
    file = Path(source).expanduser()
    if file.is_dir():
        raise DataError(f"{source} is a directory: pass a .tsv, .csv, .jsonl or .json file")
    if file.is_file():
        suffix = file.suffix.lower()
        if suffix not in _TABLE_SUFFIXES:
            raise DataError(
                f"unsupported data format {file.suffix!r} for {source}: "
                "use a .tsv, .csv, .jsonl or .json file"
            )
        if suffix in (".tsv", ".csv"):
            table = _read_delimited(file, source, delimiter="\t" if suffix == ".tsv" else ",")
        else:
            table = _read_json(file, source)
        hub_layout = None
    elif isinstance(path, os.PathLike) or _looks_like_file(source):
        raise DataError(f"data file {source} not found: check the path")
    else:
        table, hub_layout = _read_hub(source, split)

    return _examples_from_table(
        table,
        text_column=text_column,
        pair_column=pair_column,
        label_column=label_column,
        limit=limit,
        layout_hint=hub_layout,
    )


@dataclass
class _Table:
    """Rows of one source before column selection (internal)."""

    source: str
    columns: list[str]
    rows: Iterable[Sequence[Any]]
    # Rows with a different number of fields than the header are dropped; None = don't check.
    width: int | None
    headerless_cola: bool = False
    # Hub ClassLabel columns, where -1 means "no label" (e.g. GLUE test splits).
    class_label_columns: frozenset[str] = frozenset()
    # Keeps the underlying file open until the rows have been consumed.
    handle: Any = None


def _looks_like_file(name: str) -> bool:
    """Whether a non-existent ``name`` is meant as a local file rather than a hub dataset."""
    if name.startswith((".", "/", "~", "\\")) or (os.sep in name and Path(name).parent.exists()):
        return True
    return Path(name).suffix.lower() in _FILE_LIKE_SUFFIXES


def _open_text(file: Path, source: str):
    try:
        # utf-8-sig drops the byte-order mark that spreadsheet exports put before the header.
        return open(file, encoding="utf-8-sig", newline="")
    except OSError as err:
        raise DataError(f"cannot read {source} ({err.strerror}): check the path and permissions") from err


def _not_utf8(file: Path, source: str, err: UnicodeDecodeError) -> DataError:
    """A one-line error naming the line and column of the first byte that is not UTF-8.

    The decoder reads the file in chunks, so the error's own offsets (and the csv reader's line
    count) do not say where the byte is; the file is decoded again as a whole to find it.
    """
    try:
        raw = file.read_bytes()
    except OSError:
        return DataError(f"{source} is not UTF-8 text ({err.reason}): re-save it as UTF-8")
    start = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        raw[start:].decode("utf-8")
        position = err.start
    except UnicodeDecodeError as whole:
        position = start + whole.start
    line = raw.count(b"\n", 0, position) + 1
    column = position - (raw.rfind(b"\n", 0, position) + 1) + 1
    byte = raw[position : position + 1].hex() or "end of file"
    return DataError(f"{source} is not UTF-8 text: byte 0x{byte} on line {line}, column {column} cannot be decoded; re-save the file as UTF-8")


def _read_delimited(file: Path, source: str, delimiter: str) -> _Table:
    """Open a TSV/CSV file and read its header; the rows are read lazily."""
    handle = _open_text(file, source)
    if delimiter == "\t":
        # GLUE TSVs are not quoted; MNLI/QQP contain stray quote characters inside sentences.
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(handle)
    try:
        first = next(reader, None)
        while first is not None and not any(cell.strip() for cell in first):
            first = next(reader, None)  # leading blank lines
    except UnicodeDecodeError as err:
        handle.close()
        raise _not_utf8(file, source, err) from err
    except csv.Error as err:
        handle.close()
        raise DataError(f"cannot parse {source} line {reader.line_num} ({err}): check the file format") from err
    if first is None:
        handle.close()
        raise DataError(f"{source} is empty: pass a file with a header row and at least one example")

    header = [cell.strip() for cell in first]
    if _is_headerless_cola(header):
        logger.info("%s has no header row and CoLA's 4-column layout: reading it as raw CoLA", source)
        rows = _iter_rows(reader, source, file, first_row=first)
        return _Table(source, list(_COLA_COLUMNS), rows, width=4, headerless_cola=True, handle=handle)
    return _Table(source, header, _iter_rows(reader, source, file), width=len(header), handle=handle)


def _is_headerless_cola(first_row: list[str]) -> bool:
    return (
        len(first_row) == 4
        and not any(cell.lower() in _KNOWN_HEADER_NAMES for cell in first_row)
        and first_row[1] in ("0", "1")
    )


def _iter_rows(reader, source: str, file: Path, first_row: list[str] | None = None) -> Iterator[list[str]]:
    if first_row is not None:
        yield first_row
    try:
        for row in reader:
            if row:  # blank lines
                yield row
    except UnicodeDecodeError as err:
        raise _not_utf8(file, source, err) from err
    except csv.Error as err:
        raise DataError(f"cannot parse {source} line {reader.line_num} ({err}): check the file format") from err


def _read_json(file: Path, source: str) -> _Table:
    """Read JSON lines, or a JSON list of objects."""
    with _open_text(file, source) as handle:
        try:
            content = handle.read()
        except UnicodeDecodeError as err:
            raise _not_utf8(file, source, err) from err
    stripped = content.lstrip()
    if not stripped:
        raise DataError(f"{source} is empty: pass a file with at least one JSON object")

    records: list[Any]
    if stripped.startswith("["):
        try:
            records = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise DataError(f"cannot parse {source} as a JSON list ({err}): check the file format") from err
        except RecursionError as err:
            raise DataError(f"cannot parse {source}: JSON nested too deeply; write one flat object per example") from err
    else:
        records = []
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except RecursionError as err:
                raise DataError(f"cannot parse line {number} of {source}: JSON nested too deeply; write one flat object per line") from err
            except json.JSONDecodeError as err:
                raise DataError(
                    f"cannot parse line {number} of {source} as JSON ({err.msg}): "
                    "write one JSON object per line, or a JSON list of objects"
                ) from err
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(
                f"item {index} of {source} is a {type(record).__name__}, not an object: "
                'write one object per example, e.g. {"text": ..., "label": ...}'
            )
    if not records:
        raise DataError(f"{source} has no rows: pass a file with at least one JSON object")

    columns: dict[str, None] = {}  # union of keys, in first-seen order
    for record in records:
        columns.update(dict.fromkeys(record))
    names = list(columns)
    return _Table(source, names, ([record.get(name) for name in names] for record in records), width=None)


def _read_hub(name: str, split: str) -> tuple[_Table, str | None]:
    """Load ``name`` (``"dataset"`` or ``"dataset:config"``) with the ``datasets`` library."""
    dataset_name, _, config = name.partition(":")
    fix = "pass a local .tsv/.csv/.jsonl file or check your network"
    try:
        import datasets  # noqa: PLC0415 -- optional dependency, only for hub names
    except ImportError as err:
        raise DataError(
            f"cannot load dataset {name!r} from the hub: the 'datasets' package is not installed "
            f"(pip install 'fwsvd[data]'), or {name!r} is meant as a file that does not exist: "
            "pass a local .tsv/.csv/.jsonl file"
        ) from err

    errors: tuple[type[BaseException], ...] = (OSError, ConnectionError, ValueError, ImportError)
    try:
        from datasets.exceptions import DatasetNotFoundError  # noqa: PLC0415

        errors = (*errors, DatasetNotFoundError)
    except ImportError:
        pass
    try:
        dataset = datasets.load_dataset(dataset_name, config or None, split=split)
    except errors as err:
        raise DataError(f"cannot load dataset {name!r} from the hub ({err}): {fix}") from err

    columns = list(dataset.column_names)
    features = getattr(dataset, "features", None) or {}
    class_labels = frozenset(column for column, feature in features.items() if getattr(feature, "names", None))
    rows = ([record.get(column) for column in columns] for record in dataset)
    config_name = config.lower()
    layout = config_name if dataset_name.split("/")[-1].lower() == "glue" and config_name in _GLUE_LAYOUTS else None
    return _Table(name, columns, rows, width=None, class_label_columns=class_labels), layout


def _find_column(columns: list[str], name: str) -> int | None:
    """Index of ``name`` in ``columns``: exact match first, then case-insensitive."""
    if name in columns:
        return columns.index(name)
    folded = name.strip().casefold()
    for index, column in enumerate(columns):
        if column.casefold() == folded:
            return index
    return None


def _require_column(table: _Table, name: str, option: str) -> int:
    index = _find_column(table.columns, name)
    if index is None:
        raise DataError(
            f"column {name!r} not found in {table.source} (columns: {', '.join(table.columns)}): "
            f"pass one of these as {option}"
        )
    return index


def _examples_from_table(
    table: _Table,
    *,
    text_column: str | None,
    pair_column: str | None,
    label_column: str | None,
    limit: int | None,
    layout_hint: str | None,
) -> Examples:
    try:
        text_idx, pair_idx = _choose_text_columns(table, text_column, pair_column)
        if label_column is not None:
            label_idx: int | None = _require_column(table, label_column, "--label-column")
        else:
            used = {text_idx, pair_idx}
            label_idx = next(
                (
                    index
                    for candidate in _LABEL_CANDIDATES
                    if (index := _find_column(table.columns, candidate)) is not None and index not in used
                ),
                None,
            )
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


def _choose_text_columns(
    table: _Table, text_column: str | None, pair_column: str | None
) -> tuple[int, int | None]:
    columns = table.columns
    pair_idx = _require_column(table, pair_column, "--pair-column") if pair_column is not None else None
    if text_column is not None:
        text_idx = _require_column(table, text_column, "--text-column")
    else:
        text_idx = None
        if pair_column is None:
            for first, second in _PAIR_CANDIDATES:
                a, b = _find_column(columns, first), _find_column(columns, second)
                if a is not None and b is not None:
                    return a, b
            for first, _ in _PAIR_CANDIDATES:  # a lone "sentence1" is still a text column
                if (a := _find_column(columns, first)) is not None and first not in _TEXT_CANDIDATES:
                    text_idx = a
                    break
        else:
            # The first column of a pair whose second half is the given pair column, else any text.
            for first, second in _PAIR_CANDIDATES:
                if _find_column(columns, second) == pair_idx and (a := _find_column(columns, first)) is not None:
                    text_idx = a
                    break
        if text_idx is None:
            text_idx = next(
                (
                    index
                    for candidate in _TEXT_CANDIDATES
                    if (index := _find_column(columns, candidate)) is not None and index != pair_idx
                ),
                None,
            )
        if text_idx is None:
            raise DataError(
                f"no text column found in {table.source} (columns: {', '.join(columns)}): "
                "pass --text-column NAME"
            )
    if pair_idx is not None and pair_idx == text_idx:
        raise DataError(
            f"text and pair column are both {columns[text_idx]!r} in {table.source}: "
            "pass two different columns"
        )
    return text_idx, pair_idx


def _collect(
    table: _Table, text_idx: int, pair_idx: int | None, label_idx: int | None, limit: int | None
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
            label = _parse_label(row[label_idx])
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


def _parse_label(value: Any) -> int | float | str | None:
    """Raw label as read: int if integer-looking, float if decimal-looking, str otherwise."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    text = str(value).strip()
    if text in _MISSING_LABELS:
        return None
    if _INT_RE.fullmatch(text):
        return int(text)
    if _FLOAT_RE.fullmatch(text):
        return float(text)
    return text


def _layout(table: _Table, text_names: tuple[str, ...], label_name: str | None) -> str:
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
# Plain text and labels
# ---------------------------------------------------------------------------------------------


def read_text(path: str | os.PathLike) -> str:
    """Read a plain UTF-8 text file (e.g. WikiText) for causal language models.

    Args:
        path: The ``.txt`` file.

    Returns:
        The whole text, unchanged.

    Raises:
        DataError: If the file is missing, not UTF-8, or empty (or whitespace only).
    """
    source = os.fspath(path)
    file = Path(source).expanduser()
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "not found"
        raise DataError(f"text file {source} {what}: pass a plain .txt file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(file, source, err) from err
    except OSError as err:
        raise DataError(f"cannot read {source} ({err.strerror}): check the path and permissions") from err
    if not text.strip():
        raise DataError(f"{source} is empty: pass a text file with some content")
    return text


def label_mapping(
    labels: list | None,
    *,
    label2id: Mapping[str, int] | None = None,
    num_labels: int | None = None,
    regression: bool | None = None,
    source: str = "the data",
) -> tuple[list[int] | list[float], bool, dict[str, int] | None]:
    """Turn raw labels into model targets.

    The task is a regression when ``regression`` is True, or (when it is None) when
    ``num_labels == 1``, or when ``num_labels`` is None and the labels are numbers that are not
    all integers. Otherwise it is a classification: integer labels are used as they are; string
    labels are mapped through ``label2id`` when all of them are its keys (exactly, else ignoring
    case), else through their digits when numeric, else through the sorted list of distinct
    strings.

    Args:
        labels: Raw labels, as in :attr:`Examples.labels`.
        label2id: The model's ``config.label2id``, if any.
        num_labels: The model's number of outputs, if known; class ids must lie in
            ``[0, num_labels)``.
        regression: Force regression (True) or classification (False); detect when None.
        source: What the labels came from, for error messages (e.g. the file path).

    Returns:
        ``(targets, is_regression, label2id_used)``: ints for classification or floats for
        regression; the mapping used for string labels, else ``None``.

    Raises:
        DataError: If there are no labels, a label is missing, not a number where one is needed,
            NaN/infinite, not an integer class id, or outside the model's classes.
    """
    if not labels:
        raise DataError(
            f"{source} has no labels: evaluation and Fisher calibration need a label column "
            "(pass --label-column NAME)"
        )
    if num_labels is not None and num_labels < 1:
        raise DataError(f"num_labels must be at least 1, got {num_labels}: check the model config")

    values: list[int | float | str] = []
    for position, raw in enumerate(labels):
        value = _parse_label(raw)
        if value is None:
            raise DataError(f"label at position {position} in {source} is missing: fill it in or drop the row")
        values.append(value)
    numeric = all(not isinstance(value, str) for value in values)
    if not numeric and any(not isinstance(value, str) for value in values):
        example = next(value for value in values if not isinstance(value, str))
        word = next(value for value in values if isinstance(value, str))
        raise DataError(
            f"labels in {source} mix numbers ({example!r}) and words ({word!r}): "
            "use one kind of label throughout"
        )

    if regression is None:
        regression = num_labels == 1 or (
            num_labels is None and numeric and any(not float(value).is_integer() for value in values)
        )

    if regression:
        if not numeric:
            word = next(value for value in values if isinstance(value, str))
            raise DataError(
                f"label {word!r} in {source} is not a number, but the task is a regression: "
                "check the label column or use a classification model"
            )
        targets = [float(value) for value in values]
        for value in targets:
            if not math.isfinite(value):
                raise DataError(
                    f"regression label {value} in {source} is not a finite number: fix or drop those rows"
                )
        return targets, True, None

    used: dict[str, int] | None = None
    if numeric:
        for value in values:
            if not float(value).is_integer():
                raise DataError(
                    f"label {value!r} in {source} is not a class id: check the label column, "
                    "or use a regression model (num_labels=1) for continuous scores"
                )
        ids = [int(value) for value in values]
    else:
        strings = [str(value) for value in values]
        used = _string_label_map(strings, label2id, num_labels, source)
        ids = [used[value] for value in strings]

    for value in ids:
        if num_labels is not None and not 0 <= value < num_labels:
            raise DataError(
                f"label {value} in {source} is outside the model's {num_labels} classes "
                f"(0..{num_labels - 1}): check the label column or fine-tune a head with the right "
                "number of classes"
            )
        if value < 0:
            raise DataError(
                f"label {value} in {source} is negative, not a class id: drop unlabelled rows "
                "or check the label column"
            )
    return ids, False, used


def _string_label_map(
    strings: list[str], label2id: Mapping[str, int] | None, num_labels: int | None, source: str
) -> dict[str, int]:
    distinct = sorted(set(strings))
    if label2id:
        if all(value in label2id for value in distinct):
            return {value: int(label2id[value]) for value in distinct}
        folded = {key.casefold(): int(index) for key, index in label2id.items()}
        if len(folded) == len(label2id) and all(value.casefold() in folded for value in distinct):
            return {value: folded[value.casefold()] for value in distinct}
        if not all(_DEFAULT_LABEL_RE.fullmatch(key) for key in label2id):
            logger.warning(
                "labels in %s (%s) do not match the model's label2id (%s): mapping them in sorted order",
                source,
                ", ".join(distinct[:10]),
                ", ".join(label2id),
            )
    if num_labels is not None and len(distinct) > num_labels:
        shown = ", ".join(repr(value) for value in distinct[:10])
        raise DataError(
            f"{source} has {len(distinct)} distinct labels ({shown}) but the model has {num_labels} "
            "classes: check the label column or fine-tune a head with the right number of classes"
        )
    return {value: index for index, value in enumerate(distinct)}


# ---------------------------------------------------------------------------------------------
# Tokenizing and batching
# ---------------------------------------------------------------------------------------------


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
        text: The text, e.g. from :func:`read_text`.
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
    starts = range(n_blocks)
    if samples is not None and samples < n_blocks:
        starts = sorted(random.Random(seed).sample(range(n_blocks), samples))
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
        labels: Targets aligned with ``items``, as from :func:`label_mapping`; added as a
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
        table = _read_json(file, source)
    elif isinstance(path, os.PathLike) or _looks_like_file(source):
        raise DataError(f"data file {source} not found: check the path")
    else:
        table, _ = _read_hub(source, split)
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
