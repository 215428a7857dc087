"""Task metrics of a (compressed) model on labelled data or, for causal LMs, perplexity on text."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import data as d
from . import metrics as m
from ..errors import DataError, ModelError
from ..device import model_device
from ..storage.loading import LoadedModel

logger = logging.getLogger(__name__)

__all__ = ["RESULT_KEYS", "EvalConfig", "check_result_names", "evaluate", "evaluate_files", "merge_named", "split_list"]

#: Keys that ``fwsvd eval`` may write at the top level of its JSON object besides the named
#: per-file and per-task results; a data file or zero-shot task may not be named like one of them.
RESULT_KEYS = frozenset(
    {"accuracy", "f1", "mcc", "pearson", "spearman", "mse", "perplexity", "nll", "n", "tokens", "metric", "seconds", "wall_seconds", "task", "data", "tasks"}
)


@dataclass
class EvalConfig:
    """Evaluation options."""

    data: str
    limit: int | None = None  # rows (classification) or blocks (causal LM)
    batch_size: int = 32
    max_length: int | None = None  # default 128 for classification, 512 for causal LM
    text_column: str | None = None
    pair_column: str | None = None
    label_column: str | None = None


def evaluate(loaded: LoadedModel, config: EvalConfig, *, progress: bool = True) -> dict[str, Any]:
    """Evaluate on ``config.data``.

    Returns:
        For classifiers ``accuracy``, ``mcc`` (and ``f1`` for two classes); for regression
        ``pearson``, ``spearman``, ``mse``; for causal LMs ``perplexity`` and ``nll``; always ``n``
        (rows or blocks), ``metric`` (the headline key) and ``seconds``.

    Raises:
        DataError: for empty, unlabelled or mismatched data.
    """
    if loaded.tokenizer is None:
        raise ModelError(f"{loaded.source} has no tokenizer: save the tokenizer files into the model folder")
    if config.limit is not None and config.limit < 1:
        raise DataError(f"--limit {config.limit} must be a positive number of rows or blocks")
    start = time.perf_counter()
    model = loaded.model
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if loaded.task == "causal-lm":
                result = _perplexity(loaded, config, progress)
            elif loaded.task == "token-classification":
                result = _token_classification(loaded, config, progress)
            else:
                result = _sequence_classification(loaded, config, progress)
    finally:
        model.train(was_training)
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _perplexity(loaded: LoadedModel, config: EvalConfig, progress: bool) -> dict[str, Any]:
    """Non-overlapping blocks, mean token NLL over all predicted tokens, exponentiated."""
    length = config.max_length or 512
    blocks = d.causal_blocks_from_file(loaded.tokenizer, config.data, length, limit=config.limit)
    total_nll = 0.0
    n_tokens = 0
    device = model_device(loaded.model)  # the tokens go where the model is
    for chunk in tqdm(blocks.split(max(1, config.batch_size // 8)), desc="perplexity", unit="batch", disable=not progress, leave=False):
        chunk = chunk.to(device)
        logits = loaded.model(input_ids=chunk).logits.float()
        # Each block predicts its own tokens 2..L from the preceding ones.
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        n_tokens += chunk[:, 1:].numel()
    ppl = m.perplexity(total_nll, n_tokens)
    return {"perplexity": ppl, "nll": total_nll / n_tokens, "n": int(blocks.shape[0]), "tokens": n_tokens, "metric": "perplexity"}


def _logits(loaded: LoadedModel, items: list[dict[str, list[int]]], batch_size: int, progress: bool) -> list[torch.Tensor]:
    out = []
    device = model_device(loaded.model)  # the batches go where the model is, the logits come back
    for batch in tqdm(
        d.batches(items, batch_size, loaded.tokenizer.pad_token_id),
        total=math.ceil(len(items) / batch_size),
        desc="evaluating",
        unit="batch",
        disable=not progress,
        leave=False,
    ):
        logits = loaded.model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        if not torch.isfinite(logits).all():
            raise ModelError("the model produced NaN or infinite logits: its weights are corrupt")
        out.append(logits)
    return out


def _sequence_classification(loaded: LoadedModel, config: EvalConfig, progress: bool) -> dict[str, Any]:
    examples = d.read_labelled(
        config.data, text_column=config.text_column, pair_column=config.pair_column, label_column=config.label_column, limit=config.limit
    )
    if examples.labels is None:
        raise DataError(f"{config.data} has no label column: evaluation needs labels (or pass --label-column)")
    targets, regression, _ = d.model_label_mapping(examples.labels, loaded.model.config, source=str(config.data))
    items = d.encode_examples(loaded.tokenizer, examples, config.max_length or 128)
    logits = torch.cat(_logits(loaded, items, config.batch_size, progress))
    if regression:
        result = m.regression_metrics(targets, logits[:, 0].tolist())
    else:
        result = m.classification_metrics(targets, logits.argmax(-1).tolist(), loaded.model.config.num_labels)
    result["metric"] = m.headline_metric(examples.layout, regression)
    result["n"] = len(targets)
    return result


def _token_classification(loaded: LoadedModel, config: EvalConfig, progress: bool) -> dict[str, Any]:
    examples = d.read_token_labelled(config.data, limit=config.limit)
    mc = loaded.model.config
    items, targets = d.encode_token_examples(
        loaded.tokenizer, examples, config.max_length or 128, num_labels=mc.num_labels, label2id=getattr(mc, "label2id", None)
    )
    y_true: list[int] = []
    y_pred: list[int] = []
    for i, logits in enumerate(_logits(loaded, items, config.batch_size, progress)):
        for row, labels in zip(logits.argmax(-1), targets[i * config.batch_size : (i + 1) * config.batch_size]):
            for pred, gold in zip(row.tolist(), labels):
                if gold != -100:
                    y_true.append(gold)
                    y_pred.append(pred)
    result = m.classification_metrics(y_true, y_pred, mc.num_labels)
    result["metric"] = "accuracy"
    result["n"] = len(examples)
    result["tokens"] = len(y_true)
    return result


def split_list(values: str | Iterable[str] | None) -> list[str]:
    """Items of a repeatable, comma-separated option: ``["a.txt,b.txt", "c.txt"]`` -> three items."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def evaluate_files(
    loaded: LoadedModel, config: EvalConfig, files: Sequence[str | os.PathLike], *, progress: bool = True
) -> dict[str, dict[str, Any]]:
    """:func:`evaluate` on each file with the same options, keyed by file stem.

    Two files with one stem (``wikitext-2/test.txt``, ``ptb/test.txt``) are keyed with as many
    parent folders as tell them apart (``wikitext-2/test``, ``ptb/test``).

    Raises:
        DataError: for a file given twice, or any error of :func:`evaluate`.
    """
    from .zeroshot import unique_names

    names = unique_names(files, "data file")
    return {name: evaluate(loaded, dataclasses.replace(config, data=os.fspath(f)), progress=progress) for name, f in zip(names, files)}


def check_result_names(names: Sequence[str], taken: Iterable[str] = ()) -> None:
    """Names of per-file and per-task results must differ from each other, from :data:`RESULT_KEYS`
    and from the keys in ``taken``.

    Raises:
        DataError: naming the clash.
    """
    taken = RESULT_KEYS | set(taken)
    for i, name in enumerate(names):
        if name in taken or name in names[:i]:
            raise DataError(
                f"the result name {name!r} is taken (a key of eval's output, or another data file's or task's name): rename that file"
            )


def merge_named(result: dict[str, Any], named: dict[str, dict[str, Any]], listing: str) -> dict[str, Any]:
    """Put named results (per file, per task) at the top level of ``result``, their names under ``listing``.

    Raises:
        DataError: when a name is already a key of ``result`` or one of :data:`RESULT_KEYS`.
    """
    check_result_names(list(named), taken=result)
    return {**result, **named, listing: list(named)}
