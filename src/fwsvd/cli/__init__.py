"""The ``fwsvd`` command line: a thin wrapper over :mod:`fwsvd.api`, one module per command.

Human tables by default, one JSON object with ``--json``. A problem the user can fix prints one
line on stderr and exits with status 2; nothing already on disk is touched.

Each command module (:mod:`.compress`, :mod:`.evaluate`, :mod:`.inspect`, :mod:`.finetune`, :mod:`.export`) owns its
``add_parser(subparsers)``, its ``run(args)`` and its ``format_result(result)``; what they share is in
:mod:`.common`. This module assembles the parser and runs a command (:func:`main`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..errors import FwsvdError
from ..version import __version__
from . import compress, evaluate, export, finetune, inspect, resize
from .common import EXIT_USAGE, Parser, positive_int

__all__ = ["COMMANDS", "EXIT_USAGE", "build_parser", "main", "positive_int"]

# command name -> (run, format_result), in the order of ``fwsvd --help``
COMMANDS = {
    "compress": (compress.run, compress.format_result),
    "eval": (evaluate.run, evaluate.format_result),
    "inspect": (inspect.run, inspect.format_result),
    "finetune": (finetune.run, finetune.format_result),
    "resize": (resize.run, resize.format_result),
    "export": (export.run, export.format_result),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``fwsvd`` parser: each command module adds its subcommand."""
    parser = Parser(prog="fwsvd", description="Low-rank compression of Hugging Face transformers (FWSVD, ASVD, SVD-LLM).")
    parser.add_argument("--version", action="version", version=f"fwsvd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in (compress, evaluate, inspect, finetune, resize, export):
        module.add_parser(sub)
    return parser


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    import transformers

    # transformers' own load-time chatter (unused weights, tied keys) is noise for this tool.
    transformers.logging.set_verbosity_error()
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        transformers.logging.disable_progress_bar()
        disable_progress_bars()


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, like Ctrl-C's :class:`KeyboardInterrupt`."""


def _terminate_like_interrupt() -> Any:
    """Make SIGTERM raise :class:`KeyboardInterrupt` like Ctrl-C, so cleanup runs; returns the previous handler.

    Only from the main thread (where Python delivers signals); ``None`` when not installed.
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated

    return signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fwsvd`` console script; returns the exit status.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) ``compress`` runs data-parallel (see
    :mod:`fwsvd.calibration.distributed`): rank 0 alone prints, logs and writes, and an error on any process
    is printed once while every process exits non-zero.
    """
    from ..calibration import distributed

    parser = build_parser()
    args = parser.parse_args(argv)
    launched = distributed.launched()
    main_rank = distributed.env_rank() == 0
    if not main_rank:
        args.quiet = True  # progress bars and messages once, from rank 0
    _setup_logging(args.quiet)
    if not main_rank:
        import warnings

        logging.getLogger().setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
    run, fmt = COMMANDS[args.command]
    start = time.perf_counter()
    previous = _terminate_like_interrupt()
    try:
        if launched and args.command != "compress":
            raise FwsvdError(f"fwsvd {args.command} runs in one process: launch it without torchrun (only compress calibrates on several)")
        distributed.init_from_env()
        # Under --json stdout carries the one JSON object only: anything a library prints goes to stderr.
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            result = run(args)
    except distributed.PeerFailed:
        return 1  # the failing process printed the error
    except FwsvdError as err:
        return _fail(f"fwsvd: error: {err}", EXIT_USAGE)
    except OSError as err:
        # Disk full, permission denied and the like: one line, the files already on disk untouched.
        return _fail(f"fwsvd: error: {err.strerror or err} ({err.filename or 'file system'})", 1)
    except KeyboardInterrupt as err:
        # Ctrl-C or SIGTERM: the finally blocks on the way up removed any temporary output folder.
        # torchrun hands the signal to every process: rank 0 says so.
        terminated = isinstance(err, _Terminated)
        if main_rank:
            print(f"fwsvd: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except Exception:
        distributed.report_failure()  # a bug: the others stop, this process shows its traceback
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        distributed.shutdown()
    result.setdefault("wall_seconds", round(time.perf_counter() - start, 3))
    if not main_rank:
        return 0
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(fmt(result))
    return 0


def _fail(line: str, status: int) -> int:
    """Print ``line`` on stderr unless another process of a torchrun job prints the error; return ``status``."""
    from ..calibration import distributed

    if distributed.report_failure() if distributed.current().active else distributed.env_rank() == 0:
        print(line, file=sys.stderr)
    return status
