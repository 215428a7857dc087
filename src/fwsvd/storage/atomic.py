"""Atomic output folders and files: write beside the target, then rename, so nothing on disk is half-written.

Every writer of a folder ``parent/name`` holds an advisory lock on ``parent`` from the moment it
creates its temporary ``parent/.name.*.partial`` folder until the swap is done. Two writers of one
output therefore take turns (the last one's model stands, nothing is left over), and whatever
``.name.*.partial`` / ``.name.*.old`` a killed run left behind is known to be stale and is removed
by the next writer (an ``.old`` folder is put back first when the run died between the two renames
of the swap).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import FwsvdError

__all__ = [
    "atomic_dir",
    "atomic_file",
    "atomic_write_text",
    "check_output_dir",
    "check_output_file",
    "check_writable_parent",
    "follow_umask",
    "refuse_busy_output",
    "scratch_dir",
]


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh hidden temporary file beside ``path``; on success it replaces ``path`` in one rename.

    The temporary name is unique (``.NAME.XXXX.partial``), so no other file is ever touched; on any
    error it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with _signals_deferred():
            tmp.replace(path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to a hidden temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        follow_umask(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _contains(outer: Path, inner: Path) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it (both resolved)."""
    return inner == outer or outer in inner.parents


def check_writable_parent(target: str | os.PathLike, what: str = "--out") -> None:
    """Check that ``target`` can be created: its nearest existing ancestor is a writable folder.

    Tried for real (a probe folder is made and removed), so it also holds for root and for
    read-only file systems, where permission bits say nothing.

    Raises:
        FwsvdError: when a file stands in the way or the folder cannot be written.
    """
    path = Path(target).expanduser().absolute()
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise FwsvdError(f"cannot create {what} {target}: {ancestor} is a file, not a folder; choose another {what}")
    try:
        probe = tempfile.mkdtemp(prefix=".fwsvd-probe.", dir=ancestor)
        os.rmdir(probe)
    except OSError as err:
        raise FwsvdError(f"cannot write {what} {target}: {_refusal(ancestor, err)}; choose another {what}") from err


def _refusal(folder: Path, err: OSError) -> str:
    """Why ``folder`` refused a new entry, in words (``/proc`` answers ENOENT, which reads as a missing file)."""
    import errno

    if err.errno in (errno.EACCES, errno.EPERM):
        return f"folder {folder} is not writable (permission denied)"
    if err.errno == errno.EROFS:
        return f"folder {folder} is on a read-only file system"
    if err.errno == errno.ENOSPC:
        return f"the file system of {folder} is full"
    # Not the errno's own words: /proc answers ENOENT ("No such file or directory") for a folder that exists.
    return f"folder {folder} does not accept new files"


def _is_protected(resolved: Path, protect: Iterable[tuple[str, str | os.PathLike | None]]) -> tuple[str, str | os.PathLike] | None:
    """The first protected input that ``resolved`` is, or lies inside; ``None`` when none."""
    for what, other in protect:
        if other is None:
            continue
        inner = Path(other).expanduser().resolve()
        if resolved == inner or inner in resolved.parents:
            return what, other
    return None


def check_output_file(
    target: str | os.PathLike,
    overwrite: bool,
    what: str,
    *,
    protect: Iterable[tuple[str, str | os.PathLike | None]] = (),
) -> Path:
    """Check, before any work, that the file ``target`` may be written; returns it as a ``Path``.

    The one guard of every output file (``--save-stats`` and the like): it is never an input, nor
    inside an input folder or an output folder that will be replaced (``protect``, whatever
    ``overwrite`` says), never an existing file unless ``overwrite``, never a folder, and its folder
    must accept new files.

    Args:
        target: the file to write.
        overwrite: whether an existing file (not an input) may be replaced.
        what: the option that names it, for messages (``--save-stats``).
        protect: ``(what, path)`` pairs of inputs and output folders; ``None`` paths are skipped.

    Raises:
        FwsvdError: naming the file and the fix.
    """
    path = Path(target).expanduser()
    resolved = path.resolve()
    hit = _is_protected(resolved, protect)
    if hit is not None:
        other_what, other = hit
        relation = "is" if resolved == Path(other).expanduser().resolve() else "lies inside"
        raise FwsvdError(f"{what} {target} {relation} the {other_what} {other}: writing it would change or lose it; choose another file")
    if path.is_dir():
        raise FwsvdError(f"{what} {target} is a folder: name the file to write")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FwsvdError(f"{what} {target} exists: pass --overwrite to replace it, or choose another file")
        if not path.is_file():
            raise FwsvdError(f"{what} {target} exists and is not a regular file: choose another file")
    check_writable_parent(path, what)
    return path


def check_output_dir(
    target: str | os.PathLike,
    overwrite: bool,
    *,
    protect: Iterable[tuple[str, str | os.PathLike | None]] = (),
) -> Path:
    """Check that ``target`` may be written before any work is done; returns it as a ``Path``.

    Args:
        target: the output folder.
        overwrite: whether a non-empty folder may be replaced.
        protect: ``(what, path)`` pairs of inputs (model folder, statistics file, data) that
            replacing ``target`` must not delete; ``None`` paths are skipped.

    Raises:
        FwsvdError: when ``target`` is the current folder or holds it, is a file, holds or is a
            protected path, is a non-empty folder and ``overwrite`` is false, or cannot be created.
    """
    path = Path(target).expanduser()
    resolved = path.resolve()
    if _contains(resolved, Path.cwd().resolve()):
        raise FwsvdError(f"output {target} is the current folder or holds it: replacing it would delete your files; choose a new folder as --out")
    if path.exists() and not path.is_dir():
        raise FwsvdError(f"output {path} is a file, not a folder: choose another --out")
    for what, other in protect:
        if other is None:
            continue
        if _contains(resolved, Path(other).expanduser().resolve()):
            raise FwsvdError(f"--out {target} is or holds the {what} {other}: replacing it would delete it; write the output to another folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FwsvdError(f"output folder {path} exists and is not empty: pass --overwrite to replace it or choose another --out")
    if not path.is_dir():
        check_writable_parent(path)
    elif not os.access(path.parent, os.W_OK | os.X_OK):
        raise FwsvdError(f"cannot replace output folder {path}: its folder {path.parent} is not writable; choose another --out")
    return path


# In-process side of the folder locks: threads take turns on a re-entrant lock per folder, and only
# the outermost holder takes the file-system lock (a nested atomic_dir must not wait on itself).
_locks: dict[str, threading.RLock] = {}
_depth: dict[str, int] = {}
_locks_guard = threading.Lock()


def _flock(folder: str) -> int | None:
    """An exclusive ``flock`` on the folder itself (no lock file to leave behind); ``None`` where unsupported."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock, the renames are still atomic
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # a file system without flock: carry on unlocked
        os.close(fd)
        return None
    return fd


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder`` for the block, across processes and threads."""
    key = str(folder.resolve())
    with _locks_guard:
        rlock = _locks.setdefault(key, threading.RLock())
    with rlock:
        depth = _depth.get(key, 0)
        _depth[key] = depth + 1
        fd = _flock(key) if depth == 0 else None
        try:
            yield
        finally:
            _depth[key] = depth
            if fd is not None:
                os.close(fd)  # releases the lock


def _clean_stale(path: Path) -> None:
    """Remove what killed runs left beside ``path``; put back an ``.old`` copy if ``path`` itself is gone.

    Called with the folder lock held: no live writer owns any of these.
    """
    partials = sorted(path.parent.glob(f".{path.name}.*.partial"))
    olds = sorted(path.parent.glob(f".{path.name}.*.old"), key=lambda p: p.stat().st_mtime)
    if olds and not path.exists():
        olds.pop().rename(path)  # a run died between its two renames: the previous output comes back
    for stale in (*partials, *olds):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def follow_umask(path: str | os.PathLike) -> None:
    """Give a written file the permissions the umask allows (safetensors writes its files 0600)."""
    os.chmod(path, 0o666 & ~_umask())


def _fix_modes(folder: Path) -> None:
    """Give everything under ``folder`` the permissions the umask allows (mkdtemp and some writers use 0600/0700)."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            file = os.path.join(root, name)
            if not os.path.islink(file):
                os.chmod(file, 0o666 & ~mask)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done, so a swap is never left half-way by Ctrl-C."""
    signals = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` in one rename.

    On any error (Ctrl-C and SIGTERM included) the temporary folder is removed and ``target`` is
    left exactly as it was. Concurrent writers of one target take turns; files get the usual
    permissions (the umask applies).

    Raises:
        FwsvdError: as :func:`check_output_dir`.
    """
    path = check_output_dir(target, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(path.parent):
        _clean_stale(path)
        # Another writer may have finished while this one waited for the lock.
        path = check_output_dir(target, overwrite)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        try:
            yield tmp
            _fix_modes(tmp)
            with _signals_deferred():
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
            with contextlib.suppress(OSError):
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)


def _try_flock(folder: Path) -> int | None:
    """A non-blocking exclusive ``flock`` on ``folder``: its descriptor, or ``None`` when another holder has it."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def refuse_busy_output(target: str | os.PathLike, overwrite: bool) -> None:
    """Fail before any work when another live process is writing the output folder ``target`` now.

    That writer holds the lock on the output's parent folder and has its ``.NAME.*.partial`` folder
    there; without ``overwrite`` this run could only fail at its end, when the other's output stands.

    Raises:
        FwsvdError: when ``target`` is being written and ``overwrite`` is false.
    """
    path = Path(target).expanduser().absolute()
    if overwrite or not path.parent.is_dir() or not any(path.parent.glob(f".{path.name}.*.partial")):
        return
    try:
        fd = _try_flock(path.parent)
    except (ImportError, OSError):  # pragma: no cover - no flock here: nothing to tell
        return
    if fd is not None:
        os.close(fd)  # nobody holds it: the partial folders are stale, the next write removes them
        return
    raise FwsvdError(
        f"another process is writing the output folder {target} now: wait for it and choose another --out, "
        "or pass --overwrite to replace its output after it"
    )


def _sweep_scratch(root: Path, prefix: str) -> None:
    """Remove the scratch folders of ``prefix`` whose process died (their lock is free)."""
    for folder in root.glob(f"{prefix}*"):
        if not folder.is_dir() or folder.is_symlink():
            continue
        try:
            fd = _try_flock(folder)
        except OSError:
            continue
        if fd is None:
            continue  # a live run holds it
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A private scratch folder in the temporary directory, removed at the end, even after a SIGKILL.

    The folder (``PREFIX<pid>-XXXX``) is locked for as long as the run lives; every new scratch
    folder of the same prefix first removes those whose lock is free, i.e. whose run was killed
    before it could clean up.
    """
    root = Path(tempfile.gettempdir())
    _sweep_scratch(root, prefix)
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root))
    fd: int | None = None
    try:
        with contextlib.suppress(ImportError, OSError):
            fd = _try_flock(folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if fd is not None:
            os.close(fd)
