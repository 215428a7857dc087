"""Atomic output folders and files: write beside the target, then rename, so nothing on disk is half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import FwsvdError

__all__ = ["atomic_dir", "atomic_write_text", "check_output_dir"]


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to a hidden temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def check_output_dir(target: str | os.PathLike, overwrite: bool) -> Path:
    """Check that ``target`` may be written; returns it as a ``Path``.

    Raises:
        FwsvdError: when ``target`` is a file, or a non-empty folder and ``overwrite`` is false.
    """
    path = Path(target).expanduser()
    if path.exists() and not path.is_dir():
        raise FwsvdError(f"output {path} is a file, not a folder: choose another --out")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FwsvdError(f"output folder {path} exists and is not empty: pass --overwrite to replace it or choose another --out")
    return path


@contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` in one rename.

    On any error the temporary folder is removed and ``target`` is left exactly as it was.

    Raises:
        FwsvdError: as :func:`check_output_dir`.
    """
    path = check_output_dir(target, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    # mkdtemp makes a 0700 folder; a saved model should get the usual permissions (umask applies).
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
        if path.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            backup.rmdir()
            path.rename(backup)
            try:
                tmp.rename(path)
            except OSError:
                backup.rename(path)  # put the old folder back before failing
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
