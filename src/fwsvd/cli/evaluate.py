"""``fwsvd eval``: a task metric, perplexity or zero-shot scores of a dense or compressed model."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import FwsvdError
from .common import add_data_options, add_device_option, add_output_options, memory_line, positive_int, table


def add_parser(sub: Any) -> None:
    """Add the ``eval`` command to the subparsers ``sub``."""
    from ..storage.loading import TASKS

    e = sub.add_parser("eval", help="task metric (accuracy, F1, MCC, correlation) or perplexity", description="Evaluate a dense or compressed model.")
    e.add_argument("model", metavar="MODEL", help="model folder or hub id, or a `fwsvd export` folder (scored through onnxruntime)")
    e.add_argument(
        "--data", action="append", default=None, metavar="FILE",
        help="labelled .tsv/.csv/.jsonl, or .txt for causal-LM perplexity; several files comma-separated or repeated (results keyed by file name)",
    )
    e.add_argument(
        "--tasks", action="append", default=None, metavar="TASK[,TASK...]",
        help="zero-shot tasks of a causal LM, scored as lm-evaluation-harness does: piqa, arc_easy, winogrande, "
        "lambada_openai (read from --task-data DIR) or paths of .jsonl files (query/choices/gold, "
        "context_options/continuation/gold, or context/continuation)",
    )
    e.add_argument("--task-data", default=None, metavar="DIR", help="folder holding <name>.jsonl for the task names in --tasks")
    e.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N rows (N blocks of text; N examples of each zero-shot task)")
    e.add_argument("--task", choices=list(TASKS), default=None, help="model task (detected when omitted)")
    add_data_options(e, calibration=False)
    add_device_option(e)
    add_output_options(e)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``fwsvd eval``: the --tasks files are checked before the model loads; return the scores as a dict."""
    from ..errors import ModelError
    from ..evaluation.evaluate import EvalConfig, check_result_names, evaluate, evaluate_files, merge_named, split_list
    from ..evaluation.zeroshot import evaluate_zeroshot, resolve_tasks, unique_names
    from ..device import StageMemory, place, resolve_device
    from ..export.onnx import is_export_folder, load_onnx
    from ..storage.loading import load_model

    stages = StageMemory(resolve_device(args.device))  # a GPU this machine lacks fails before any work
    files, task_specs = split_list(args.data), split_list(args.tasks)
    if not files and not task_specs:
        raise FwsvdError("nothing to evaluate: pass --data FILE (task metric or perplexity) and/or --tasks piqa,arc_easy,... --task-data DIR (zero-shot)")
    if args.task_data is not None and not task_specs:
        raise FwsvdError("--task-data is the folder of the --tasks files: add --tasks NAME[,NAME...]")
    # Task files are read and checked before the model loads, so a typo fails at once.
    tasks = resolve_tasks(task_specs, args.task_data, limit=args.limit) if task_specs else []
    check_result_names([*(unique_names(files, "data file") if len(files) > 1 else []), *(t.name for t in tasks)])
    with stages.stage("load"):
        if is_export_folder(args.model):  # a `fwsvd export` folder: scored through onnxruntime, on the CPU
            loaded = load_onnx(args.model, args.task)
        else:
            loaded = load_model(args.model, args.task, need_tokenizer=True, allow_pickle=args.allow_pickle)
            place(loaded.model, stages.device)
    if tasks and loaded.task != "causal-lm":
        raise ModelError(f"--tasks scores causal language models; {args.model} is a {loaded.task} model: evaluate it with --data")
    config = EvalConfig(
        data=files[0] if files else "", limit=args.limit, batch_size=args.batch_size or 32, max_length=args.max_length,
        text_column=args.text_column, pair_column=args.pair_column, label_column=args.label_column,
    )
    result: dict[str, Any] = {}
    with stages.stage("eval"):
        if len(files) == 1:
            result = evaluate(loaded, config, progress=not args.quiet)
        elif files:
            result = merge_named(result, evaluate_files(loaded, config, files, progress=not args.quiet), "data")
    if tasks:
        with stages.stage("tasks"):
            scores = evaluate_zeroshot(loaded.model, loaded.tokenizer, tasks, batch_size=args.batch_size or 32, progress=not args.quiet)
        result = merge_named(result, scores, "tasks")
    result["task"] = loaded.task
    result["memory"] = stages.to_dict()
    return result


def format_result(result: dict[str, Any]) -> str:
    """The human tables of an eval run: one --data file's metrics, several files', the zero-shot tasks'."""
    parts = []
    if "metric" in result:  # one --data file: its metrics at the top level
        parts.append(_metric_table(result))
    if result.get("data"):
        rows = [[name, result[name]["metric"], f"{result[name][result[name]['metric']]:.4f}", result[name]["n"]] for name in result["data"]]
        parts.append(table(["data", "metric", "value", "n"], rows))
    if result.get("tasks"):
        def cell(scores: dict[str, Any], key: str) -> str:
            return f"{scores[key]:.4f}" if key in scores else "-"

        rows = [[name, *(cell(result[name], k) for k in ("acc", "acc_norm", "perplexity")), result[name]["n"]] for name in result["tasks"]]
        parts.append(table(["task", "acc", "acc_norm", "perplexity", "n"], rows))
    if (result.get("data") or result.get("tasks")) and "wall_seconds" in result:
        parts[-1] += f"\n({result['wall_seconds']:.1f} s in all)"
    if result.get("memory") and parts:
        parts[-1] += "\n" + memory_line(result["memory"])
    return "\n\n".join(parts)


def _metric_table(result: dict[str, Any]) -> str:
    keys = [k for k in ("accuracy", "f1", "mcc", "pearson", "spearman", "mse", "perplexity", "nll") if k in result]
    rows = [[k + (" *" if k == result.get("metric") else ""), f"{result[k]:.4f}"] for k in keys]
    rows.append(["n", str(result["n"])])
    return table(["metric", "value"], rows) + f"\n(* headline metric; {result['seconds']:.1f} s)"
