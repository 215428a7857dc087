"""Reading sources into tables: delimited and JSON files, Hugging Face hub datasets, plain text.

Local files are read by extension:

* ``.tsv`` -- GLUE layout, read with :mod:`csv` and ``quoting=csv.QUOTE_NONE`` because MNLI and
  QQP contain unbalanced quote characters inside sentences. CoLA's raw ``train.tsv``/``dev.tsv``
  have no header row and are recognised by their shape.
* ``.csv`` -- a header row, standard CSV quoting.
* ``.jsonl`` / ``.json`` -- one JSON object per line, or a JSON list of objects.

Anything else that is not an existing file is taken as a Hugging Face ``datasets`` hub name,
optionally ``"name:config"`` (e.g. ``"glue:sst2"``); ``datasets`` is imported only then.

A source is read into a :class:`Table` (column names and lazily read rows);
:func:`choose_columns` then finds the text, pair and label columns by name
(case-insensitively) unless they are given explicitly.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "Table",
    "choose_columns",
    "looks_like_file",
    "read_hub",
    "read_json",
    "read_table",
    "read_text",
    "text_chunks",
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
class Table:
    """Rows of one source before column selection."""

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


def read_table(path: str | os.PathLike, split: str = "train") -> tuple[Table, str | None]:
    """Open a ``.tsv``, ``.csv``, ``.jsonl`` or ``.json`` file, or load a hub dataset.

    Args:
        path: The file, or a Hugging Face hub dataset name, optionally ``"name:config"``.
        split: Split to load for hub datasets; ignored for local files.

    Returns:
        ``(table, layout)``: the table (whose open file the caller closes through
        ``table.handle``), and the GLUE layout that a hub name like ``"glue:cola"`` implies,
        else ``None``.

    Raises:
        DataError: If the file is missing, empty, malformed or in an unsupported format, or the
            hub dataset cannot be loaded.
    """
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
            table = read_json(file, source)
        hub_layout = None
    elif isinstance(path, os.PathLike) or looks_like_file(source):
        raise DataError(f"data file {source} not found: check the path")
    else:
        table, hub_layout = read_hub(source, split)
    return table, hub_layout


def looks_like_file(name: str) -> bool:
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
    count) do not say where the byte is; the file is scanned again, in blocks, to find it (a
    byte-order mark decodes as UTF-8 too, so it does not move the position).
    """
    try:
        position = _first_undecodable(file)
        if position is None:
            position = err.start
        line, column, byte = _locate_byte(file, position)
    except OSError:
        return DataError(f"{source} is not UTF-8 text ({err.reason}): re-save it as UTF-8")
    return DataError(f"{source} is not UTF-8 text: byte 0x{byte} on line {line}, column {column} cannot be decoded; re-save the file as UTF-8")


# Bytes read at a time when a file is scanned for the position of a bad byte.
_SCAN_BYTES = 1 << 20


def _first_undecodable(file: Path) -> int | None:
    """Byte offset of the first byte of ``file`` that does not decode as UTF-8, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    read = 0
    with open(file, "rb") as handle:
        while True:
            block = handle.read(_SCAN_BYTES)
            pending = len(decoder.getstate()[0])  # undecoded tail of the previous block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                # The error's offsets count from the pending tail, which precedes this block.
                return read - pending + err.start
            if not block:
                return None
            read += len(block)


def _locate_byte(file: Path, position: int) -> tuple[int, int, str]:
    """Line and column (1-based) of byte ``position`` of ``file``, and the byte in hex ("end of file" past the end)."""
    line, line_start, read, byte = 1, 0, 0, ""
    with open(file, "rb") as handle:
        while read <= position:
            block = handle.read(_SCAN_BYTES)
            if not block:
                break
            head = block[: position - read]
            line += head.count(b"\n")
            last = head.rfind(b"\n")
            if last >= 0:
                line_start = read + last + 1
            if position - read < len(block):
                byte = block[position - read : position - read + 1].hex()
            read += len(block)
    return line, position - line_start + 1, byte or "end of file"


def _read_delimited(file: Path, source: str, delimiter: str) -> Table:
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
        return Table(source, list(_COLA_COLUMNS), rows, width=4, headerless_cola=True, handle=handle)
    return Table(source, header, _iter_rows(reader, source, file), width=len(header), handle=handle)


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


def read_json(file: Path, source: str) -> Table:
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
    return Table(source, names, ([record.get(name) for name in names] for record in records), width=None)


def read_hub(name: str, split: str) -> tuple[Table, str | None]:
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
    return Table(name, columns, rows, width=None, class_label_columns=class_labels), layout


def _find_column(columns: list[str], name: str) -> int | None:
    """Index of ``name`` in ``columns``: exact match first, then case-insensitive."""
    if name in columns:
        return columns.index(name)
    folded = name.strip().casefold()
    for index, column in enumerate(columns):
        if column.casefold() == folded:
            return index
    return None


def _require_column(table: Table, name: str, option: str) -> int:
    index = _find_column(table.columns, name)
    if index is None:
        raise DataError(
            f"column {name!r} not found in {table.source} (columns: {', '.join(table.columns)}): "
            f"pass one of these as {option}"
        )
    return index


def choose_columns(
    table: Table, text_column: str | None, pair_column: str | None, label_column: str | None
) -> tuple[int, int | None, int | None]:
    """Indices of the text, pair and label columns of ``table``: the given names, else detected.

    An explicit ``text_column`` is used as a single text unless ``pair_column`` is given too; an
    explicit ``pair_column`` alone is paired with the detected text column. Pairs of known names
    are tried before single text columns. The label column is ``None`` when not given and no
    other column has a known label name.

    Raises:
        DataError: If a named column does not exist, or no text column can be found.
    """
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
    return text_idx, pair_idx, label_idx


def _choose_text_columns(
    table: Table, text_column: str | None, pair_column: str | None
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


def _plain_text_file(path: str | os.PathLike) -> tuple[Path, str]:
    source = os.fspath(path)
    file = Path(source).expanduser()
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "not found"
        raise DataError(f"text file {source} {what}: pass a plain .txt file")
    return file, source


def _open_plain_text(file: Path, source: str):
    try:
        # Universal newlines and no BOM stripping, exactly as Path.read_text(encoding="utf-8").
        return open(file, encoding="utf-8")
    except OSError as err:
        raise DataError(f"cannot read {source} ({err.strerror}): check the path and permissions") from err


def _binary(file: Path, source: str) -> DataError:
    """The error for a text with a NUL character: names the byte offset of the first NUL byte."""
    offset, read = None, 0
    try:
        with open(file, "rb") as handle:
            while block := handle.read(_SCAN_BYTES):
                if (found := block.find(b"\0")) >= 0:
                    offset = read + found
                    break
                read += len(block)
    except OSError:
        pass
    where = f" at byte offset {offset:,}" if offset is not None else ""
    return DataError(f"{source} is binary, not text (a NUL byte{where}): pass a plain UTF-8 .txt file")


def read_text(path: str | os.PathLike) -> str:
    """Read a plain UTF-8 text file (e.g. WikiText) for causal language models.

    The whole file is held in memory; :func:`text_chunks` reads it piece by piece.

    Args:
        path: The ``.txt`` file.

    Returns:
        The whole text, with universal newlines (``\\r\\n`` and ``\\r`` read as ``\\n``).

    Raises:
        DataError: If the file is missing, not UTF-8, binary (has a NUL byte), or empty (or
            whitespace only).
    """
    file, source = _plain_text_file(path)
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(file, source, err) from err
    except OSError as err:
        raise DataError(f"cannot read {source} ({err.strerror}): check the path and permissions") from err
    if "\0" in text:
        raise _binary(file, source)
    if not text.strip():
        raise DataError(f"{source} is empty: pass a text file with some content")
    return text


def text_chunks(path: str | os.PathLike, chunk_chars: int) -> Iterator[str]:
    """Read a plain UTF-8 text file piece by piece: joined, the pieces are :func:`read_text`'s text.

    The file is checked before the first piece is returned: it must exist and have a character
    other than whitespace (found by reading only up to that character). Later problems (a byte that
    is not UTF-8, a NUL byte) raise when the reading reaches them, so a caller that stops early may
    never see them.

    Args:
        path: The ``.txt`` file.
        chunk_chars: Characters per piece (the last piece may be shorter).

    Returns:
        An iterator of strings of ``chunk_chars`` characters; memory is one piece at a time.

    Raises:
        DataError: If the file is missing, not UTF-8, binary (has a NUL byte), or empty (or
            whitespace only).
    """
    file, source = _plain_text_file(path)
    with _open_plain_text(file, source) as handle:
        while True:
            chunk = _read_chunk(handle, file, source, chunk_chars)
            if not chunk:
                raise DataError(f"{source} is empty: pass a text file with some content")
            if "\0" in chunk:
                raise _binary(file, source)
            if chunk.strip():
                break
    return _chunks(file, source, chunk_chars)


def _read_chunk(handle: Any, file: Path, source: str, chunk_chars: int) -> str:
    try:
        return handle.read(chunk_chars)
    except UnicodeDecodeError as err:
        raise _not_utf8(file, source, err) from err
    except OSError as err:
        raise DataError(f"cannot read {source} ({err.strerror}): check the path and permissions") from err


def _chunks(file: Path, source: str, chunk_chars: int) -> Iterator[str]:
    with _open_plain_text(file, source) as handle:
        while chunk := _read_chunk(handle, file, source, chunk_chars):
            if "\0" in chunk:
                raise _binary(file, source)
            yield chunk
