"""``fwsvd finetune``: fine-tune a classifier or causal LM (dense or compressed), or give an encoder a task head."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import FwsvdError
from .common import add_device_option, add_output_options, check_out, field_help, finetune_line, fmt_int, positive_int, table


def add_parser(sub: Any) -> None:
    """Add the ``finetune`` command to the subparsers ``sub``."""
    from ..training.finetune import TRAINABLE, FinetuneConfig

    f = sub.add_parser(
        "finetune", help="fine-tune a classifier or causal LM (dense or compressed), or add a head to a pretrained encoder",
        description="Fine-tune a sequence classifier on labelled data, or a causal LM on a text file, and save it. A pretrained "
        "encoder without a task head gets one (classes counted from the labels; one output for a regression task such as "
        "STS-B). A compressed model keeps its ranks and trains its low-rank factors; a causal LM keeps the state with the "
        "best perplexity on held-out blocks of its text.",
    )
    f.add_argument("model", metavar="MODEL", help="model folder: a classifier or causal LM (dense or compressed), or a pretrained encoder")
    f.add_argument("--data", required=True, metavar="TRAIN", help=field_help(FinetuneConfig, "data"))
    f.add_argument("--out", required=True, help="output folder (written atomically)")
    f.add_argument("--eval-data", default=None, metavar="DEV", help="labelled data scored after each epoch; the best epoch by the headline metric is saved (else the last)")
    f.add_argument("--epochs", type=positive_int, default=None, help=field_help(FinetuneConfig, "epochs"))
    f.add_argument("--tokens", type=positive_int, default=None, help=field_help(FinetuneConfig, "tokens"))
    f.add_argument("--lr", type=float, default=None, help=field_help(FinetuneConfig, "lr"))
    f.add_argument("--batch-size", type=positive_int, default=None, help=field_help(FinetuneConfig, "batch_size"))
    f.add_argument("--max-length", type=positive_int, default=None, help=field_help(FinetuneConfig, "max_length"))
    f.add_argument("--distill", action=argparse.BooleanOptionalAction, default=None, help=field_help(FinetuneConfig, "distill") + " (--teacher)")
    f.add_argument("--teacher", default=None, metavar="DENSE", help="causal LMs: the dense model folder to distil from (distillation is then on)")
    f.add_argument("--train", choices=list(TRAINABLE), default=None, help=field_help(FinetuneConfig, "train"))
    f.add_argument("--seed", type=int, default=0, help=field_help(FinetuneConfig, "seed"))
    f.add_argument("--limit", type=positive_int, default=None, help=field_help(FinetuneConfig, "limit"))
    f.add_argument("--warmup", type=float, default=0.1, help=field_help(FinetuneConfig, "warmup"))
    for name in ("text_column", "pair_column", "label_column"):
        f.add_argument("--" + name.replace("_", "-"), default=None, help=field_help(FinetuneConfig, name))
    f.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    add_device_option(f, "; a --teacher goes there too")
    add_output_options(f)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``fwsvd finetune``: check the options and --out, load, fine-tune, save; return the summary as a dict."""
    from .. import api
    from ..evaluation.evaluate import EvalConfig
    from ..training.finetune import FinetuneConfig, finetune, load_for_finetune

    config = FinetuneConfig(
        data=args.data, epochs=args.epochs, tokens=args.tokens, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
        seed=args.seed, limit=args.limit, warmup=args.warmup, train=args.train,
        # --teacher names the model to distil from, so it turns distillation on unless --no-distill says otherwise.
        distill=args.distill if args.distill is not None else (True if args.teacher is not None else None),
        text_column=args.text_column, pair_column=args.pair_column, label_column=args.label_column, device=args.device,
    )
    out = check_out(args, args.model, ("training data", args.data), ("evaluation data", args.eval_data), ("teacher model", args.teacher))
    eval_config = None
    if args.eval_data is not None:
        eval_config = EvalConfig(
            data=args.eval_data, batch_size=max(args.batch_size or 32, 32), max_length=args.max_length,
            text_column=args.text_column, pair_column=args.pair_column, label_column=args.label_column,
        )
    loaded = load_for_finetune(args.model, config, allow_pickle=args.allow_pickle)
    resolved = config.resolved(compressed=True, task=loaded.task)  # settings checked before any work
    if args.teacher is not None and resolved.distill is False:
        raise FwsvdError("--teacher is the model to distil from: drop --no-distill, or drop --teacher")
    if resolved.distill and args.teacher is None:
        raise FwsvdError("--distill needs the dense model: pass --teacher DENSE_FOLDER")
    teacher = None
    if args.teacher is not None:
        from ..storage.loading import load_model

        teacher = load_model(args.teacher, "causal-lm", allow_pickle=args.allow_pickle).model
    from ..device import StageMemory, resolve_device

    stages = StageMemory(resolve_device(config.device))
    with stages.stage("finetune"):
        result = finetune(loaded, config, eval_config=eval_config, progress=not args.quiet, teacher=teacher)
    api.save(loaded.model, out, loaded.tokenizer, overwrite=args.overwrite)
    result["memory"] = stages.to_dict()
    result["out"] = str(out)
    result["task"] = loaded.task
    result["parameters"] = api.count_parameters(loaded.model)
    return result


def format_result(result: dict[str, Any]) -> str:
    """The human table of a fine-tuning run: per step (causal LM) or per epoch (classifier), then its summary."""
    if result.get("task") == "causal-lm":
        rows = [
            [h["step"], fmt_int(h["tokens"]), "-" if h["loss"] is None else f"{h['loss']:.4f}",
             ("inf" if h["perplexity"] is None else f"{h['perplexity']:.3f}") + (" *" if h["step"] == result["best_step"] else "")]
            for h in result["history"]
        ]
        return "\n".join([
            table(["step", "tokens", "train loss", "held-out perplexity"], rows), "", finetune_line(result),
            f"kept step {result['best_step']} (* best held-out perplexity)",
            f"{'compressed' if result['compressed'] else 'dense'} model, {fmt_int(result['parameters'])} parameters; saved to {result['out']}",
        ])
    metric = result.get("metric")
    rows = []
    for h in result["history"]:
        row = [h["epoch"], f"{h['loss']:.4f}"]
        if metric:
            value = h["eval"][h["eval"]["metric"]]
            row.append(f"{value:.4f}" + (" *" if h["epoch"] == result["best_epoch"] else ""))
        row.append(f"{h['seconds']:.1f}")
        rows.append(row)
    headers = ["epoch", "train loss"] + ([f"{metric} ({result['eval_data']})"] if metric else []) + ["seconds"]
    lines = [table(headers, rows), "", finetune_line(result)]
    if metric:
        lines.append(f"kept epoch {result['best_epoch']} (* best {metric})")
    lines.append(f"{'compressed' if result['compressed'] else 'dense'} model, {fmt_int(result['parameters'])} parameters; saved to {result['out']}")
    return "\n".join(lines)
