"""Fine-tuning sequence classifiers, dense or compressed, with a plain torch training loop.

Two uses:

* a fresh classifier: :func:`load_for_finetune` on a pretrained encoder folder without a task head
  adds one (classes counted from the training labels, or one output for a regression task);
* recovery after compression (FWSVD + fine-tuning): a compressed model keeps its structure and
  ranks; its low-rank factors (``LowRankLinear.weight_in`` / ``weight_out``) train together with
  everything else, and the compression record gains a ``finetune`` entry.

Typical use::

    import fwsvd
    from fwsvd.evaluate import EvalConfig
    from fwsvd.finetune import FinetuneConfig, finetune, load_for_finetune
    config = FinetuneConfig(data="train.tsv", epochs=3)
    loaded = load_for_finetune("all-MiniLM-L6-v2", config)
    summary = finetune(loaded, config, eval_config=EvalConfig(data="dev.tsv"))
    fwsvd.save(loaded.model, "out", tokenizer=loaded.tokenizer)
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import data as d
from .api import _help
from .errors import DataError, FwsvdError, ModelError
from .evaluate import EvalConfig, evaluate
from .hf import compression_record
from .models import (
    LoadedModel,
    _first_line,
    _load_config,
    _load_weights,
    check_no_custom_code,
    detect_task,
    load_model,
    model_source,
    weight_shapes,
)
from .nn import LowRankLinear

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EPOCHS",
    "DEFAULT_LR",
    "FinetuneConfig",
    "build_classifier",
    "finetune",
    "head_config",
    "is_compressed",
    "load_for_finetune",
]

#: Epochs when none is given: a compressed model only needs to recover what the factorization lost,
#: a fresh head has to learn the task.
DEFAULT_EPOCHS = {"compressed": 1, "dense": 3}
#: Learning rates when none is given. For one recovery epoch of MiniLM/SST-2 at keep 0.3, 5e-5 to 3e-4
#: all landed within noise of each other, 1e-4 at the top and 5e-4 diverged (README "Fine-tuning").
DEFAULT_LR = {"compressed": 1e-4, "dense": 5e-5}
#: Batch sizes when none is given. A recovery run is usually a single epoch: batches of 16 give it
#: twice the updates of 32 (MiniLM/SST-2 keep 0.3, 5 seeds: mean dev accuracy 0.853 vs 0.851).
DEFAULT_BATCH_SIZE = {"compressed": 16, "dense": 32}

# Batches are formed from windows of this many batches' worth of examples sorted by length, so that
# padding is small while the order stays random (the "group by length" of transformers' Trainer).
_GROUP_WINDOW = 50


@dataclass
class FinetuneConfig:
    """What to fine-tune on and how. Every field's help text is reused by the command line."""

    data: str = _help("training data: labelled .tsv/.csv/.jsonl (GLUE layouts detected) or a datasets hub name")
    epochs: int | None = _help(
        f"passes over the training data (default {DEFAULT_EPOCHS['compressed']} for a compressed model, "
        f"{DEFAULT_EPOCHS['dense']} otherwise)",
        default=None,
    )
    lr: float | None = _help(
        f"peak learning rate of AdamW (default {DEFAULT_LR['compressed']:g} for a compressed model, {DEFAULT_LR['dense']:g} otherwise)",
        default=None,
    )
    batch_size: int | None = _help(
        f"training batch size (default {DEFAULT_BATCH_SIZE['compressed']} for a compressed model, {DEFAULT_BATCH_SIZE['dense']} otherwise)",
        default=None,
    )
    max_length: int = _help("tokens per example, longer ones are truncated (64 is enough for short sentences)", default=128)
    seed: int = _help("seed for the head's initialization, the shuffling and dropout", default=0)
    limit: int | None = _help("train on this many rows drawn at random with --seed (all rows when omitted)", default=None)
    warmup: float = _help("fraction of the steps spent warming the learning rate up linearly from 0; it then decays linearly to 0", default=0.1)
    weight_decay: float = _help("AdamW weight decay (not applied to biases and LayerNorm weights)", default=0.01)
    max_grad_norm: float = _help("gradients are clipped to this total norm", default=1.0)
    group_by_length: bool = _help("batch examples of similar length together (less padding, same randomness of order)", default=True)
    text_column: str | None = _help("name of the text column (detected when omitted)", default=None)
    pair_column: str | None = _help("name of the second text column of a pair task (detected when omitted)", default=None)
    label_column: str | None = _help("name of the label column (detected when omitted)", default=None)

    def __post_init__(self) -> None:
        if not self.data:
            raise DataError("fine-tuning needs training data: pass --data with a labelled file")
        self.data = os.fspath(self.data)
        for name in ("epochs", "batch_size", "max_length", "limit"):
            value = getattr(self, name)
            if value is None and name != "max_length":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FwsvdError(f"--{name.replace('_', '-')} {value!r} must be a positive integer")
        if self.lr is not None and (not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0):
            raise FwsvdError(f"--lr {self.lr!r} must be a positive number such as 5e-5")
        if not 0 <= self.warmup < 1:
            raise FwsvdError(f"warmup {self.warmup!r} must be a fraction of the steps in [0, 1)")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise FwsvdError("weight decay must be ≥ 0 and the gradient clipping norm > 0")

    def resolved(self, compressed: bool) -> FinetuneConfig:
        """A copy with ``epochs``, ``lr`` and ``batch_size`` filled in for a compressed or dense model."""
        kind = "compressed" if compressed else "dense"
        return replace(
            self, epochs=self.epochs or DEFAULT_EPOCHS[kind], lr=self.lr or DEFAULT_LR[kind], batch_size=self.batch_size or DEFAULT_BATCH_SIZE[kind]
        )

    def read(self) -> d.Examples:
        """The training examples (all rows, before ``limit``)."""
        return d.read_labelled(self.data, text_column=self.text_column, pair_column=self.pair_column, label_column=self.label_column)


def is_compressed(model: nn.Module) -> bool:
    """Whether ``model`` carries an fwsvd compression record or low-rank layers."""
    return compression_record(getattr(model, "config", None)) is not None or any(isinstance(m, LowRankLinear) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Building a classifier
# ---------------------------------------------------------------------------------------------


def head_config(labels: Sequence[Any], layout: str = "single") -> dict[str, Any]:
    """Config fields of a classification head for these training labels.

    A regression (one output, ``problem_type="regression"``) for the STS-B layout or decimal
    labels; otherwise one output per class: integer labels are class ids ``0..max``, string labels
    get ``label2id`` / ``id2label`` in sorted order.

    Args:
        labels: raw labels as in :attr:`fwsvd.data.Examples.labels`.
        layout: the data layout (:attr:`fwsvd.data.Examples.layout`).

    Returns:
        Keyword arguments for the model config: ``num_labels``, ``problem_type`` and, for string
        labels, ``label2id`` and ``id2label``.

    Raises:
        DataError: when there are no labels or fewer than two classes.
    """
    if not labels:
        raise DataError("the training data has no labels: pass --label-column NAME")
    regression = layout == "stsb" or any(isinstance(v, float) and not isinstance(v, bool) for v in labels)
    targets, regression, used = d.label_mapping(list(labels), regression=regression)
    if regression:
        return {"num_labels": 1, "problem_type": "regression"}
    num_labels = max(targets) + 1
    if num_labels < 2:
        raise DataError(f"the training labels hold a single class ({labels[0]!r}): a classifier needs at least two")
    out: dict[str, Any] = {"num_labels": num_labels, "problem_type": "single_label_classification"}
    if used is not None:
        out["label2id"] = dict(used)
        out["id2label"] = {i: name for name, i in used.items()}
    missing = sorted(set(range(num_labels)) - set(targets))
    if missing:
        logger.warning("class ids %s never occur in the training labels: the head still has %d outputs", missing, num_labels)
    return out


def build_classifier(
    model: str | os.PathLike, config: FinetuneConfig, examples: d.Examples | None = None, *, allow_pickle: bool = False
) -> LoadedModel:
    """A sequence classifier with a fresh head on a pretrained encoder (a folder without a task head).

    Args:
        model: pretrained model folder or hub id (e.g. a ``BertModel``).
        config: the fine-tuning config; its training labels size the head, its seed initializes it.
        examples: the training examples, when already read.

    Raises:
        ModelError: when the model cannot be loaded or has no sequence-classification class.
        DataError: for unusable training labels.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    examples = examples if examples is not None else config.read()
    head = head_config(examples.labels or [], examples.layout)
    source, gguf_file = model_source(model)
    if gguf_file:
        raise ModelError(f"{model} is a GGUF file: fine-tune from a Hugging Face folder with safetensors weights")
    if Path(source).is_dir():  # never code from the folder, no pickles unless allowed
        check_no_custom_code(source)
        weight_shapes(source, allow_pickle=allow_pickle)
    safe = {"trust_remote_code": False}
    mc = _load_config(AutoConfig, source, model, safe, **head)
    try:
        prefix = AutoModelForSequenceClassification._model_mapping[type(mc)].base_model_prefix
    except KeyError:
        raise ModelError(f"{model} ({mc.model_type}) has no sequence-classification head in transformers: pass an encoder such as BERT") from None
    # Seeded so that the same settings give the same head.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        # The new head is missing from a pretrained encoder's weights, and its pretraining heads go
        # unused; every tensor of the encoder itself must load.
        net = _load_weights(
            AutoModelForSequenceClassification, source, model, safe, dtype=torch.float32, allow_pickle=allow_pickle, config=mc,
            tolerate=lambda key: not key.startswith(f"{prefix}."),
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **safe)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"cannot load the tokenizer of {model} ({_first_line(err)}): save the tokenizer files into the model folder") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(net.config, "pad_token_id", None) is None:
        net.config.pad_token_id = tokenizer.pad_token_id
    net.eval()
    desc = "regression" if head["num_labels"] == 1 else f"{head['num_labels']} classes"
    logger.info("new %s head on %s (%s)", type(net).__name__, model, desc)
    return LoadedModel(net, tokenizer, "sequence-classification", str(model))


def load_for_finetune(model: str | os.PathLike, config: FinetuneConfig, *, allow_pickle: bool = False) -> LoadedModel:
    """Load a sequence classifier (dense or compressed) as it is, or add a head to a bare encoder.

    Nothing in the folder is executed and pickle weights are refused unless ``allow_pickle`` (see
    :func:`fwsvd.models.load_model`).

    Raises:
        ModelError: for a model whose head is not sequence classification (e.g. a causal LM).
    """
    from transformers import AutoConfig

    from . import hf

    hf.register()
    source, gguf_file = model_source(model)
    if Path(source).is_dir():
        check_no_custom_code(source)
    mc = _load_config(AutoConfig, source, model, {"trust_remote_code": False, **({"gguf_file": gguf_file} if gguf_file else {})})
    try:
        task = detect_task(mc)
    except ModelError:
        task = None  # no task head: a pretrained encoder
    if task is None:
        return build_classifier(model, config, allow_pickle=allow_pickle)
    if task != "sequence-classification":
        raise ModelError(
            f"{model} is a {task} model: fwsvd finetune trains sequence classifiers; pass a classifier or a bare pretrained encoder"
        )
    return load_model(model, task, need_tokenizer=True, allow_pickle=allow_pickle)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _epoch_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator, group: bool) -> list[list[int]]:
    """Indices of one epoch's batches: a seeded permutation, optionally grouped by length."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not group:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * _GROUP_WINDOW
    out: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        out.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    # Shuffle the batches too, so a short last window is not always the last step.
    perm = torch.randperm(len(out), generator=generator).tolist()
    return [out[i] for i in perm]


def _collate(items: list[dict[str, list[int]]], targets: list, index: list[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    return next(d.batches([items[i] for i in index], len(index), pad_token_id, labels=[targets[i] for i in index]))


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Biases and normalization weights are not decayed (BERT's recipe).
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    if not decay and not no_decay:
        raise ModelError("the model has no trainable parameters: nothing to fine-tune")
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def _score(result: dict[str, Any]) -> float:
    value = result.get(result.get("metric", ""), math.nan)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


def finetune(
    loaded: LoadedModel,
    config: FinetuneConfig,
    *,
    eval_config: EvalConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``loaded.model`` in place on ``config.data``.

    AdamW with a linear warm-up/decay schedule, gradient clipping, dropout on, seeded shuffling.
    With ``eval_config`` the model is evaluated after each epoch and the best epoch by the task's
    headline metric is kept; otherwise the last. A compressed model keeps its ranks; the run is
    recorded in ``model.config`` (``quantization_config.finetune`` for a compressed model,
    ``fwsvd_finetune`` for a dense one), so :func:`fwsvd.save` writes it to ``config.json``.

    Args:
        loaded: a sequence classifier with its tokenizer (see :func:`load_for_finetune`).
        config: training data and settings; ``epochs``, ``lr`` and ``batch_size`` default by
            whether the model is compressed (:data:`DEFAULT_EPOCHS`, :data:`DEFAULT_LR`,
            :data:`DEFAULT_BATCH_SIZE`).
        eval_config: evaluation data for choosing the best epoch.
        progress: show a progress bar per epoch.

    Returns:
        A summary: the settings used, ``rows``, ``steps``, ``seconds``, ``history`` (per epoch
        ``loss``, ``seconds`` and ``eval``), ``best_epoch``, ``metric`` and ``eval`` (of the kept
        epoch, ``None`` without ``eval_config``).

    Raises:
        ModelError: for a model that is not a sequence classifier or has no tokenizer.
        DataError: for unusable training data.
    """
    from transformers import get_linear_schedule_with_warmup

    if loaded.task != "sequence-classification":
        raise ModelError(f"fine-tuning supports sequence classifiers, not {loaded.task} models: pass a classifier or a bare encoder")
    if loaded.tokenizer is None:
        raise ModelError(f"{loaded.source} has no tokenizer: save the tokenizer files into the model folder")
    model = loaded.model
    compressed = is_compressed(model)
    cfg = config.resolved(compressed)
    assert cfg.epochs is not None and cfg.lr is not None and cfg.batch_size is not None

    examples = cfg.read()
    if examples.labels is None:
        raise DataError(f"{cfg.data} has no label column: fine-tuning needs labels (or pass --label-column)")
    if cfg.limit is not None and cfg.limit < len(examples):
        keep = sorted(random.Random(cfg.seed).sample(range(len(examples)), cfg.limit))
        pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
        examples = replace(examples, texts=pick(examples.texts), text_pairs=pick(examples.text_pairs), labels=pick(examples.labels))
    if len(examples) == 0:
        raise DataError(f"{cfg.data} has no usable rows: give a file with labelled examples")
    mc = model.config
    targets, regression, _ = d.label_mapping(
        examples.labels,
        label2id=getattr(mc, "label2id", None),
        num_labels=mc.num_labels,
        regression=(mc.problem_type == "regression") or mc.num_labels == 1,
        source=cfg.data,
    )
    items = d.encode_examples(loaded.tokenizer, examples, cfg.max_length)
    lengths = [len(item["input_ids"]) for item in items]
    pad_id = loaded.tokenizer.pad_token_id
    per_epoch = math.ceil(len(items) / cfg.batch_size)
    total = per_epoch * cfg.epochs

    ranks_before = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    # Every parameter that requires a gradient trains (all of them after loading: the low-rank
    # factors, embeddings, norms and head); a caller may freeze some beforehand.
    optimizer = _optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(cfg.warmup * total), total)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    generator = torch.Generator().manual_seed(cfg.seed)
    device = params[0].device  # batches follow the model (CPU unless the caller moved it)
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor] | None, dict[str, Any] | None] = (-math.inf, 0, None, None)
    was_training = model.training
    start = time.perf_counter()
    logger.info(
        "fine-tuning %s model on %d rows of %s: %d epoch(s), lr %g, batch %d, max length %d",
        "compressed" if compressed else "dense", len(items), cfg.data, cfg.epochs, cfg.lr, cfg.batch_size, cfg.max_length,
    )
    try:
        # Dropout draws from torch's global generator: fork it so the run is seeded without
        # changing the caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            for epoch in range(1, cfg.epochs + 1):
                t0 = time.perf_counter()
                model.train()
                loss_sum, seen = 0.0, 0
                bar = tqdm(
                    _epoch_batches(lengths, cfg.batch_size, generator, cfg.group_by_length),
                    desc=f"fine-tune epoch {epoch}/{cfg.epochs}", unit="batch", disable=not progress, leave=False,
                )
                for index in bar:
                    batch = {k: v.to(device) for k, v in _collate(items, targets, index, pad_id).items()}
                    loss = model(**batch).loss
                    if not torch.isfinite(loss):
                        raise ModelError(f"the training loss became {loss.item()}: lower --lr (now {cfg.lr:g})")
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    loss_sum += loss.item() * len(index)
                    seen += len(index)
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
                bar.close()
                row: dict[str, Any] = {"epoch": epoch, "loss": loss_sum / max(seen, 1), "seconds": round(time.perf_counter() - t0, 3)}
                if eval_config is not None:
                    result = evaluate(loaded, eval_config, progress=progress)
                    row["eval"] = result
                    score = _score(result)
                    if score > best[0] or best[2] is None:
                        # Keep a copy only when a later epoch may still be worse.
                        state = {k: v.detach().clone() for k, v in model.state_dict().items()} if epoch < cfg.epochs else None
                        best = (score, epoch, state, result)
                    logger.info("epoch %d/%d: loss %.4f, %s %.4f on %s", epoch, cfg.epochs, row["loss"], result["metric"], result[result["metric"]], eval_config.data)
                else:
                    logger.info("epoch %d/%d: loss %.4f", epoch, cfg.epochs, row["loss"])
                history.append(row)
        if eval_config is not None and best[1] != cfg.epochs and best[2] is not None:
            model.load_state_dict(best[2])
            logger.info("kept epoch %d (best %s on %s)", best[1], best[3]["metric"] if best[3] else "", eval_config.data)
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    model.eval()
    ranks_after = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if ranks_after != ranks_before:  # pragma: no cover - structure never changes here
        raise ModelError("fine-tuning changed the low-rank structure")

    best_epoch = best[1] if eval_config is not None else cfg.epochs
    summary: dict[str, Any] = {
        "data": cfg.data,
        "rows": len(items),
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "seed": cfg.seed,
        "limit": cfg.limit,
        "warmup": cfg.warmup,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "compressed": compressed,
        "regression": regression,
        "steps": total,
        "seconds": round(time.perf_counter() - start, 3),
        "history": history,
        "best_epoch": best_epoch,
        "eval_data": eval_config.data if eval_config is not None else None,
        "metric": best[3]["metric"] if best[3] else None,
        "eval": best[3],
    }
    _record(model, summary)
    return summary


def _record(model: nn.Module, summary: dict[str, Any]) -> None:
    """Write a compact record of the run into the model config (``config.json`` once saved)."""
    record = {k: v for k, v in summary.items() if k not in ("history", "eval")}
    record["history"] = [
        {"epoch": h["epoch"], "loss": round(h["loss"], 6), **({h["eval"]["metric"]: h["eval"][h["eval"]["metric"]]} if "eval" in h else {})}
        for h in summary["history"]
    ]
    from . import __version__

    record["library_version"] = __version__
    qc = getattr(model.config, "quantization_config", None)
    if compression_record(model.config) is not None and qc is not None and not isinstance(qc, dict):
        previous = getattr(qc, "finetune", None)
        if previous:
            record["previous"] = [*(previous.pop("previous", []) if isinstance(previous, dict) else []), previous]
        qc.finetune = copy.deepcopy(record)
    else:
        previous = getattr(model.config, "fwsvd_finetune", None)
        if previous:
            record["previous"] = [*(previous.pop("previous", []) if isinstance(previous, dict) else []), previous]
        model.config.fwsvd_finetune = copy.deepcopy(record)

