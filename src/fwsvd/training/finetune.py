"""Fine-tuning sequence classifiers and causal LMs, dense or compressed, with a plain torch training loop.

Three uses:

* a fresh classifier: :func:`load_for_finetune` on a pretrained encoder folder without a task head
  adds one (classes counted from the training labels, or one output for a regression task);
* recovery of a compressed classifier (FWSVD + fine-tuning): the model keeps its structure and
  ranks; its low-rank factors (``LowRankLinear.weight_in`` / ``weight_out``) train together with
  everything else, and the compression record gains a ``finetune`` entry;
* recovery of a compressed causal LM: the low-rank factors train on next-token loss over blocks of
  a text file, optionally distilled from the dense model's next-token distribution, for a number of
  epochs or tokens; a held-out share of the blocks picks the best state by perplexity.

Typical use::

    import fwsvd
    from fwsvd.evaluation.evaluate import EvalConfig
    from fwsvd.training.finetune import FinetuneConfig, finetune, load_for_finetune
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import data as d
from ..evaluation import metrics
from ..config import help_field
from ..device import DEVICE_HELP, place, resolve_device
from ..errors import DataError, FwsvdError, ModelError
from ..evaluation.evaluate import EvalConfig, evaluate
from ..storage.record import compression_record
from .losses import block_nll
from ..storage.loading import LoadedModel, first_line, load_config, load_weights, check_no_custom_code, detect_task, load_model, model_source, weight_shapes
from ..nn import LowRankLinear, QuantizedLinear, check_finite_weights, find_blocks

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EPOCHS",
    "DEFAULT_LR",
    "DEFAULT_TOKENS",
    "FinetuneConfig",
    "build_classifier",
    "finetune",
    "finetune_causal",
    "head_config",
    "is_compressed",
    "load_for_finetune",
]

#: Epochs when none is given: a compressed model only needs to recover what the factorization lost,
#: a fresh head has to learn the task. Causal LMs train for :data:`DEFAULT_TOKENS` instead.
DEFAULT_EPOCHS = {"compressed": 1, "dense": 3}
#: Learning rates when none is given. For one recovery epoch of MiniLM/SST-2 at keep 0.3, 5e-5 to 3e-4
#: all landed within noise of each other, 1e-4 at the top and 5e-4 diverged (README "Fine-tuning").
#: Causal LMs: see :data:`DEFAULT_TOKENS`.
DEFAULT_LR = {"compressed": 1e-4, "dense": 5e-5, "causal-lm": 1e-4}
#: Batch sizes when none is given (rows for classifiers, --max-length token blocks for causal LMs).
#: A recovery run is usually a single epoch: batches of 16 give it twice the updates of 32
#: (MiniLM/SST-2 keep 0.3, 5 seeds: mean dev accuracy 0.853 vs 0.851).
DEFAULT_BATCH_SIZE = {"compressed": 16, "dense": 32, "causal-lm": 4}
#: Training tokens of a causal LM when neither epochs nor tokens are given.
DEFAULT_TOKENS = 65536
#: Whether causal-LM recovery distils from the dense model when ``distill`` is not set (and the dense
#: model is at hand). Off, by measurement (SmolLM2-135M keep 0.8, WikiText-2 valid, zero-shot on the
#: first 200 examples of piqa/arc_easy/winogrande/lambada; README "Decoder LLMs"): distilling did not
#: raise the mean zero-shot accuracy (next-token loss 64k tokens lr 3e-4: 0.4125; half KL 32k lr 1e-4:
#: 0.4125; KL alone 40k lr 3e-4: 0.4075), cost a quarter more time per step and a second model in
#: memory, and lowered WikiText perplexity less (21.7 / 28.3 / 33.9).
DEFAULT_DISTILL = False
#: Which parameters train by default: ``low-rank`` (the factors of the compressed layers only),
#: ``blocks`` (everything inside the transformer blocks) or ``all``.
TRAINABLE = ("low-rank", "blocks", "all")
DEFAULT_TRAIN = {"compressed": "all", "dense": "all", "causal-lm": "low-rank"}
#: Held-out blocks for choosing the best causal-LM state: a fraction of the blocks, at least one and
#: at most this many. States are compared on the same blocks, so 8 × 512 tokens rank them well; each
#: evaluation costs about a third of a training step per block (SmolLM2-135M, 2 CPUs: 16 blocks
#: evaluated 5 times took 23 % of a 64k-token run's CPU time).
MAX_HOLDOUT_BLOCKS = 8
#: Held-out evaluations of a token-budget run when no interval is given (besides the one at step 0):
#: halfway and at the end. With the learning rate decaying to 0 the end is the best state unless the
#: run diverges or overfits, which the halfway point catches.
_EVALUATIONS = 2

# Batches are formed from windows of this many batches' worth of examples sorted by length, so that
# padding is small while the order stays random (the "group by length" of transformers' Trainer).
_GROUP_WINDOW = 50


@dataclass
class FinetuneConfig:
    """What to fine-tune on and how. Every field's help text is reused by the command line."""

    data: str = help_field(
        "training data: labelled .tsv/.csv/.jsonl for classifiers (GLUE layouts detected), a .txt file for causal LMs, or a datasets hub name"
    )
    epochs: int | None = help_field(
        f"passes over the training data (default {DEFAULT_EPOCHS['compressed']} for a compressed classifier, "
        f"{DEFAULT_EPOCHS['dense']} for a dense one; causal LMs default to a token budget)",
        default=None,
    )
    tokens: int | None = help_field(
        f"causal LMs: train on this many tokens instead of whole epochs (default {DEFAULT_TOKENS:,} when --epochs is not given)",
        default=None,
    )
    lr: float | None = help_field(
        f"peak learning rate of AdamW (default {DEFAULT_LR['compressed']:g} for a compressed classifier, {DEFAULT_LR['dense']:g} "
        f"for a dense one, {DEFAULT_LR['causal-lm']:g} for a causal LM)",
        default=None,
    )
    batch_size: int | None = help_field(
        f"training batch size (default {DEFAULT_BATCH_SIZE['compressed']} for a compressed classifier, {DEFAULT_BATCH_SIZE['dense']} "
        f"for a dense one, {DEFAULT_BATCH_SIZE['causal-lm']} blocks for a causal LM)",
        default=None,
    )
    max_length: int | None = help_field(
        "tokens per example, longer ones are truncated (default 128; 64 is enough for short sentences), "
        "or per block of a causal LM's text (default 512)",
        default=None,
    )
    seed: int = help_field("seed for the head's initialization, the shuffling, the held-out blocks and dropout", default=0)
    limit: int | None = help_field("train on this many rows (causal LMs: text blocks) drawn at random with --seed (all when omitted)", default=None)
    warmup: float = help_field("fraction of the steps spent warming the learning rate up linearly from 0; it then decays linearly to 0", default=0.1)
    weight_decay: float = help_field("AdamW weight decay (not applied to biases and LayerNorm weights)", default=0.01)
    max_grad_norm: float = help_field("gradients are clipped to this total norm", default=1.0)
    group_by_length: bool = help_field("batch examples of similar length together (less padding, same randomness of order)", default=True)
    distill: bool | None = help_field(
        "causal LMs: train on the KL divergence from the dense model's next-token distribution, weighted with the "
        "next-token loss (needs the dense model; default " + ("on when it is at hand" if DEFAULT_DISTILL else "off") + "; fwsvd finetune turns it on with --teacher)",
        default=None,
    )
    train: str | None = help_field(
        "which parameters train: 'low-rank' (the compressed layers' factors), 'blocks' (everything inside the transformer "
        f"blocks) or 'all' (default {DEFAULT_TRAIN['causal-lm']} for a compressed causal LM, all otherwise)",
        default=None,
    )
    holdout: float = help_field(
        f"causal LMs: fraction of the text blocks held out to keep the state with the best perplexity (at least 1, at most "
        f"{MAX_HOLDOUT_BLOCKS} blocks)",
        default=0.1,
    )
    eval_steps: int | None = help_field(
        f"causal LMs: steps between held-out evaluations (default: after each epoch, or {_EVALUATIONS} times in a token-budget run)",
        default=None,
    )
    text_column: str | None = help_field("name of the text column (detected when omitted)", default=None)
    pair_column: str | None = help_field("name of the second text column of a pair task (detected when omitted)", default=None)
    label_column: str | None = help_field("name of the label column (detected when omitted)", default=None)
    device: str = help_field(DEVICE_HELP + "; the model (and a distillation teacher) is moved there and stays there", default="auto")

    def __post_init__(self) -> None:
        self.device = str(self.device) if self.device is not None else "auto"
        resolve_device(self.device)  # a GPU asked for where there is none fails here, before any work
        if not self.data:
            raise DataError("fine-tuning needs training data: pass --data with a labelled file")
        self.data = os.fspath(self.data)
        for name in ("epochs", "tokens", "batch_size", "max_length", "limit", "eval_steps"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FwsvdError(f"--{name.replace('_', '-')} {value!r} must be a positive integer")
        if self.epochs is not None and self.tokens is not None:
            raise FwsvdError("--epochs and --tokens both set the length of the run: pass one of them")
        if self.lr is not None and (not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0):
            raise FwsvdError(f"--lr {self.lr!r} must be a positive number such as 5e-5")
        if not 0 <= self.warmup < 1:
            raise FwsvdError(f"warmup {self.warmup!r} must be a fraction of the steps in [0, 1)")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise FwsvdError("weight decay must be ≥ 0 and the gradient clipping norm > 0")
        if not 0 < self.holdout < 1:
            raise FwsvdError(f"holdout {self.holdout!r} must be a fraction of the text blocks in (0, 1)")
        if self.train is not None and self.train not in TRAINABLE:
            raise FwsvdError(f"train {self.train!r} must be one of {', '.join(TRAINABLE)}")

    def resolved(self, compressed: bool, task: str = "sequence-classification") -> FinetuneConfig:
        """A copy with the defaults filled in for a compressed or dense model of ``task``.

        Raises:
            FwsvdError: for a causal-LM-only setting (``tokens``, ``distill``) on another task.
        """
        if task == "causal-lm":
            return replace(
                self,
                tokens=self.tokens or (None if self.epochs else DEFAULT_TOKENS),
                lr=self.lr or DEFAULT_LR[task],
                batch_size=self.batch_size or DEFAULT_BATCH_SIZE[task],
                max_length=self.max_length or 512,
                distill=self.distill,  # None: decided by whether the dense model is at hand
                train=self.train or (DEFAULT_TRAIN[task] if compressed else "all"),
            )
        if self.tokens is not None or self.distill:
            raise FwsvdError(f"--tokens and --distill are for causal LMs; a {task} model trains for --epochs on its labels")
        kind = "compressed" if compressed else "dense"
        return replace(
            self, epochs=self.epochs or DEFAULT_EPOCHS[kind], lr=self.lr or DEFAULT_LR[kind], batch_size=self.batch_size or DEFAULT_BATCH_SIZE[kind],
            max_length=self.max_length or 128, distill=False, train=self.train or DEFAULT_TRAIN[kind],
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
    mc = load_config(AutoConfig, source, model, safe, **head)
    try:
        prefix = AutoModelForSequenceClassification._model_mapping[type(mc)].base_model_prefix
    except KeyError:
        raise ModelError(f"{model} ({mc.model_type}) has no sequence-classification head in transformers: pass an encoder such as BERT") from None
    # Seeded so that the same settings give the same head.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        # The new head is missing from a pretrained encoder's weights, and its pretraining heads go
        # unused; every tensor of the encoder itself must load.
        net = load_weights(
            AutoModelForSequenceClassification, source, model, safe, dtype=torch.float32, allow_pickle=allow_pickle, config=mc,
            tolerate=lambda key: not key.startswith(f"{prefix}."),
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **safe)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"cannot load the tokenizer of {model} ({first_line(err)}): save the tokenizer files into the model folder") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(net.config, "pad_token_id", None) is None:
        net.config.pad_token_id = tokenizer.pad_token_id
    net.eval()
    desc = "regression" if head["num_labels"] == 1 else f"{head['num_labels']} classes"
    logger.info("new %s head on %s (%s)", type(net).__name__, model, desc)
    return LoadedModel(net, tokenizer, "sequence-classification", str(model))


def load_for_finetune(model: str | os.PathLike, config: FinetuneConfig, *, allow_pickle: bool = False) -> LoadedModel:
    """Load a sequence classifier or causal LM (dense or compressed) as it is, or add a head to a bare encoder.

    Nothing in the folder is executed and pickle weights are refused unless ``allow_pickle`` (see
    :func:`fwsvd.storage.loading.load_model`).

    Raises:
        ModelError: for a model whose head is neither sequence classification nor a causal LM.
    """
    from transformers import AutoConfig

    from ..storage.quantizer import register

    register()
    source, gguf_file = model_source(model)
    if Path(source).is_dir():
        check_no_custom_code(source)
    mc = load_config(AutoConfig, source, model, {"trust_remote_code": False, **({"gguf_file": gguf_file} if gguf_file else {})})
    try:
        task = detect_task(mc)
    except ModelError:
        task = None  # no task head: a pretrained encoder
    if task is None:
        return build_classifier(model, config, allow_pickle=allow_pickle)
    if task not in ("sequence-classification", "causal-lm"):
        raise ModelError(
            f"{model} is a {task} model: fwsvd finetune trains sequence classifiers and causal LMs; "
            "pass a classifier, a causal LM or a bare pretrained encoder"
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


def _select_trainable(model: nn.Module, train: str) -> list[tuple[nn.Parameter, bool]]:
    """Freeze every parameter outside ``train``'s selection; returns what to restore afterwards.

    Raises:
        ModelError: when the selection is empty (``low-rank`` on a model without low-rank layers).
    """
    if train == "all":
        return []
    if train == "low-rank":
        # Quantized layers train their correction factors (and bias); their grid is a buffer and stays.
        chosen = {id(p) for m in model.modules() if isinstance(m, (LowRankLinear, QuantizedLinear)) for p in m.parameters()}
    else:
        blocks = find_blocks(model)
        chosen = {id(p) for name in blocks for p in model.get_submodule(name).parameters()}
    if not chosen:
        what = "low-rank layers" if train == "low-rank" else "transformer blocks"
        raise ModelError(f"the model has no {what} to train: pass train 'all' (fine-tunes every parameter)")
    frozen = []
    for p in model.parameters():
        if id(p) not in chosen and p.requires_grad:
            frozen.append((p, True))
            p.requires_grad_(False)
    return frozen


def _restore_trainable(frozen: list[tuple[nn.Parameter, bool]]) -> None:
    for p, flag in frozen:
        p.requires_grad_(flag)


def _score(result: dict[str, Any]) -> float:
    value = result.get(result.get("metric", ""), math.nan)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


@dataclass
class _Optimization:
    """AdamW over the trainable parameters, its warm-up/decay schedule and the gradient clipping."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[nn.Parameter]
    max_grad_norm: float

    def step(self) -> None:
        """One update from the accumulated gradients, which are then cleared."""
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def _optimization(model: nn.Module, cfg: FinetuneConfig, total: int) -> _Optimization:
    """AdamW at ``cfg.lr`` warming up for ``cfg.warmup`` of ``total`` steps, then decaying linearly to 0."""
    from transformers import get_linear_schedule_with_warmup

    assert cfg.lr is not None
    optimizer = _optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(cfg.warmup * total), total)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return _Optimization(optimizer, scheduler, params, cfg.max_grad_norm)


def _low_rank_ranks(model: nn.Module) -> dict[str, int]:
    return {name: mod.rank for name, mod in model.named_modules() if isinstance(mod, LowRankLinear)}


def _check_trained(model: nn.Module, ranks_before: dict[str, int]) -> None:
    """Put the trained model in eval mode and check that its weights are finite and its ranks unchanged."""
    model.eval()
    check_finite_weights(model, "the fine-tuned model")  # never handed back, nor saved, with NaN weights
    if _low_rank_ranks(model) != ranks_before:  # pragma: no cover - structure never changes here
        raise ModelError("fine-tuning changed the low-rank structure")


def finetune(
    loaded: LoadedModel,
    config: FinetuneConfig,
    *,
    eval_config: EvalConfig | None = None,
    progress: bool = True,
    teacher: nn.Module | None = None,
) -> dict[str, Any]:
    """Fine-tune ``loaded.model`` in place on ``config.data``, on ``config.device`` (where the model is moved and stays).

    AdamW with a linear warm-up/decay schedule, gradient clipping, dropout on, seeded shuffling.
    A classifier trains on its labels; with ``eval_config`` it is evaluated after each epoch and
    the best epoch by the task's headline metric is kept, otherwise the last. A causal LM trains
    on next-token loss over ``max_length``-token blocks of a text file (optionally distilled from
    ``teacher``), and keeps the state with the best perplexity on held-out blocks of that text
    (see :func:`finetune_causal`). A compressed model keeps its ranks; the run is recorded in
    ``model.config`` (``quantization_config.finetune`` for a compressed model, ``fwsvd_finetune``
    for a dense one), so :func:`fwsvd.save` writes it to ``config.json``.

    Args:
        loaded: a sequence classifier or causal LM with its tokenizer (see :func:`load_for_finetune`).
        config: training data and settings; ``epochs``, ``lr`` and ``batch_size`` default by
            whether the model is compressed (:data:`DEFAULT_EPOCHS`, :data:`DEFAULT_LR`,
            :data:`DEFAULT_BATCH_SIZE`).
        eval_config: classifiers: evaluation data for choosing the best epoch.
        progress: show a progress bar per epoch.
        teacher: causal LMs: the dense model to distil from (needed when ``config.distill``).

    Returns:
        A summary: the settings used, ``rows``, ``steps``, ``seconds`` (wall), ``cpu_seconds``
        (this process's CPU time, all threads), ``history`` (per epoch ``loss``, ``seconds`` and
        ``eval``), ``best_epoch``, ``metric`` and ``eval`` (of the kept epoch, ``None`` without
        ``eval_config``). Causal LMs: see :func:`finetune_causal`.

    Raises:
        ModelError: for a model that is neither a sequence classifier nor a causal LM, or has no tokenizer.
        DataError: for unusable training data.
        FwsvdError: for settings that do not apply to the model's task.
    """
    device = place(loaded.model, config.device)
    if teacher is not None:
        place(teacher, device)
    if loaded.task == "causal-lm":
        if eval_config is not None:
            raise FwsvdError(
                "a causal LM keeps its best state by the perplexity of held-out blocks of its training text (holdout); "
                "score other text with fwsvd eval afterwards"
            )
        return finetune_causal(loaded, config, teacher=teacher, progress=progress)
    if loaded.task != "sequence-classification":
        raise ModelError(f"fine-tuning supports sequence classifiers and causal LMs, not {loaded.task} models: pass a classifier or a bare encoder")
    if loaded.tokenizer is None:
        raise ModelError(f"{loaded.source} has no tokenizer: save the tokenizer files into the model folder")
    if teacher is not None:
        raise FwsvdError("distillation from a teacher is implemented for causal LMs only")
    return _finetune_classifier(loaded, config, eval_config, progress)


# The best epoch so far: its score, number, a copy of its state (when a later epoch may still be
# worse) and its evaluation.
_BestEpoch = tuple[float, int, "dict[str, torch.Tensor] | None", "dict[str, Any] | None"]


@dataclass
class _Rows:
    """A classifier's encoded training rows, their targets and lengths, and the padding token's id."""

    items: list[dict[str, list[int]]]
    targets: list
    lengths: list[int]
    regression: bool
    pad_token_id: int


def _finetune_classifier(loaded: LoadedModel, config: FinetuneConfig, eval_config: EvalConfig | None, progress: bool) -> dict[str, Any]:
    """:func:`finetune` of a sequence classifier (the task and tokenizer are checked)."""
    model = loaded.model
    compressed = is_compressed(model)
    cfg = config.resolved(compressed)
    assert cfg.epochs is not None and cfg.lr is not None and cfg.batch_size is not None
    rows = _classifier_rows(loaded, cfg)
    total = math.ceil(len(rows.items) / cfg.batch_size) * cfg.epochs

    ranks_before = _low_rank_ranks(model)
    # With train="all" every parameter that requires a gradient trains (all of them after loading:
    # the low-rank factors, embeddings, norms and head); a caller may freeze some beforehand.
    frozen = _select_trainable(model, cfg.train or "all")
    opt = _optimization(model, cfg, total)
    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []
    best: _BestEpoch = (-math.inf, 0, None, None)
    was_training = model.training
    start, cpu_start = time.perf_counter(), time.process_time()
    logger.info(
        "fine-tuning %s model on %d rows of %s: %d epoch(s), lr %g, batch %d, max length %d",
        "compressed" if compressed else "dense", len(rows.items), cfg.data, cfg.epochs, cfg.lr, cfg.batch_size, cfg.max_length,
    )
    try:
        # Dropout draws from torch's global generator: fork it so the run is seeded without
        # changing the caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            for epoch in range(1, cfg.epochs + 1):
                row = _classifier_epoch(model, rows, opt, generator, cfg, epoch, progress)
                if eval_config is not None:
                    best = _evaluate_epoch(loaded, eval_config, row, best, cfg.epochs, progress)
                else:
                    logger.info("epoch %d/%d: loss %.4f", epoch, cfg.epochs, row["loss"])
                history.append(row)
        if eval_config is not None and best[1] != cfg.epochs and best[2] is not None:
            model.load_state_dict(best[2])
            logger.info("kept epoch %d (best %s on %s)", best[1], best[3]["metric"] if best[3] else "", eval_config.data)
    finally:
        opt.optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
        _restore_trainable(frozen)
    _check_trained(model, ranks_before)
    summary = _classifier_summary(cfg, rows, compressed, total, history, best, eval_config, start, cpu_start)
    _record(model, summary)
    return summary


def _classifier_rows(loaded: LoadedModel, cfg: FinetuneConfig) -> _Rows:
    """The labelled training rows (``limit`` of them drawn with the seed), encoded, with their targets.

    Raises:
        DataError: for data without labels or usable rows, or labels that do not fit the head.
    """
    examples = cfg.read()
    if examples.labels is None:
        raise DataError(f"{cfg.data} has no label column: fine-tuning needs labels (or pass --label-column)")
    if cfg.limit is not None and cfg.limit < len(examples):
        keep = sorted(random.Random(cfg.seed).sample(range(len(examples)), cfg.limit))
        pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
        examples = replace(examples, texts=pick(examples.texts), text_pairs=pick(examples.text_pairs), labels=pick(examples.labels))
    if len(examples) == 0:
        raise DataError(f"{cfg.data} has no usable rows: give a file with labelled examples")
    targets, regression, _ = d.model_label_mapping(examples.labels, loaded.model.config, source=cfg.data)
    items = d.encode_examples(loaded.tokenizer, examples, cfg.max_length)
    return _Rows(items, targets, [len(item["input_ids"]) for item in items], regression, loaded.tokenizer.pad_token_id)


def _classifier_epoch(
    model: nn.Module, rows: _Rows, opt: _Optimization, generator: torch.Generator, cfg: FinetuneConfig, epoch: int, progress: bool
) -> dict[str, Any]:
    """Train one epoch; returns its history row (``epoch``, mean training ``loss``, ``seconds``).

    Raises:
        ModelError: when the training loss becomes non-finite.
    """
    assert cfg.batch_size is not None and cfg.lr is not None
    t0 = time.perf_counter()
    model.train()
    device = opt.params[0].device  # batches follow the model (CPU unless the caller moved it)
    loss_sum, seen = 0.0, 0
    bar = tqdm(
        _epoch_batches(rows.lengths, cfg.batch_size, generator, cfg.group_by_length),
        desc=f"fine-tune epoch {epoch}/{cfg.epochs}", unit="batch", disable=not progress, leave=False,
    )
    for index in bar:
        batch = {k: v.to(device) for k, v in _collate(rows.items, rows.targets, index, rows.pad_token_id).items()}
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise ModelError(f"the training loss became {loss.item()}: lower --lr (now {cfg.lr:g})")
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(index)
        seen += len(index)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
    bar.close()
    return {"epoch": epoch, "loss": loss_sum / max(seen, 1), "seconds": round(time.perf_counter() - t0, 3)}


def _evaluate_epoch(
    loaded: LoadedModel, eval_config: EvalConfig, row: dict[str, Any], best: _BestEpoch, epochs: int, progress: bool
) -> _BestEpoch:
    """Evaluate the epoch of ``row`` (its result goes into ``row["eval"]``); returns the best epoch so far."""
    epoch = row["epoch"]
    result = evaluate(loaded, eval_config, progress=progress)
    row["eval"] = result
    score = _score(result)
    if score > best[0] or best[2] is None:
        # Keep a copy only when a later epoch may still be worse.
        state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()} if epoch < epochs else None
        best = (score, epoch, state, result)
    logger.info("epoch %d/%d: loss %.4f, %s %.4f on %s", epoch, epochs, row["loss"], result["metric"], result[result["metric"]], eval_config.data)
    return best


def _classifier_summary(
    cfg: FinetuneConfig, rows: _Rows, compressed: bool, total: int, history: list[dict[str, Any]], best: _BestEpoch,
    eval_config: EvalConfig | None, start: float, cpu_start: float,
) -> dict[str, Any]:
    """The summary :func:`finetune` returns for a classifier (the times run from ``start`` / ``cpu_start``)."""
    best_epoch = best[1] if eval_config is not None else cfg.epochs
    return {
        "data": cfg.data,
        "rows": len(rows.items),
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
        "regression": rows.regression,
        "train": cfg.train,
        "steps": total,
        "seconds": round(time.perf_counter() - start, 3),
        "cpu_seconds": round(time.process_time() - cpu_start, 3),
        "history": history,
        "best_epoch": best_epoch,
        "eval_data": eval_config.data if eval_config is not None else None,
        "metric": best[3]["metric"] if best[3] else None,
        "eval": best[3],
    }


# ---------------------------------------------------------------------------------------------
# Causal LMs
# ---------------------------------------------------------------------------------------------

#: Blocks per forward/backward pass within a training batch (gradients are accumulated over the batch).
_MICRO_BATCH = 1
#: Weight of the KL term when distilling: the loss is ``(1 - w) * next-token loss + w * KL(dense || model)``.
DISTILL_WEIGHT = 0.5


def _causal_loss(
    model: nn.Module, ids: torch.Tensor, teacher: nn.Module | None, weight: float
) -> tuple[torch.Tensor, float, float | None]:
    """The training objective on a batch of blocks, with its next-token and KL parts as numbers."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    # The loss in float32 whatever the model's dtype: a log-softmax over a large vocabulary.
    logp = torch.log_softmax(logits.float(), dim=-1).flatten(0, 1)
    nll = torch.nn.functional.nll_loss(logp, ids[:, 1:].reshape(-1))
    if teacher is None:
        return nll, nll.item(), None
    with torch.no_grad():
        target = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1).flatten(0, 1)
    # KL(dense || model), summed over the vocabulary, averaged over predicted tokens.
    kl = torch.nn.functional.kl_div(logp, target, log_target=True, reduction="batchmean")
    return (1 - weight) * nll + weight * kl, nll.item(), kl.item()


def _block_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless seeded batches of block indices: one permutation per epoch, cut into batches."""
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        yield from (order[i : i + batch_size] for i in range(0, n, batch_size))


def _perplexity(nll: float) -> float | None:
    ppl = metrics.perplexity(nll, 1)
    return ppl if math.isfinite(ppl) else None


def finetune_causal(
    loaded: LoadedModel, config: FinetuneConfig, *, teacher: nn.Module | None = None, progress: bool = True
) -> dict[str, Any]:
    """Recovery training of a (compressed) causal LM on a text file, in place.

    The text is cut into ``max_length``-token blocks (:func:`fwsvd.data.causal_blocks`); a seeded
    share of them (``holdout``, at least 1 and at most :data:`MAX_HOLDOUT_BLOCKS`) is held out.
    The rest train for ``epochs`` passes or ``tokens`` tokens, on next-token loss or, with
    ``distill``, on ``(1 - w)`` next-token loss plus ``w`` times the KL divergence from
    ``teacher``'s next-token distribution (``w`` = :data:`DISTILL_WEIGHT`). By default only the
    low-rank factors train (``train``). The held-out perplexity is measured before training and
    after each epoch (or every ``eval_steps`` steps), and the best state is restored at the end,
    so the run never leaves the model worse on held-out text than it found it. A non-finite loss
    stops the run early; the best state is still restored.

    Args:
        loaded: a causal LM with its tokenizer.
        config: the text file and settings (defaults: :data:`DEFAULT_TOKENS`, and ``DEFAULT_LR``,
            ``DEFAULT_BATCH_SIZE``, ``DEFAULT_TRAIN`` for ``"causal-lm"``, :data:`DEFAULT_DISTILL`).
        teacher: the dense model, for ``distill``; it only runs forward.
        progress: show a progress bar with the training loss.

    Returns:
        A summary: the settings used, ``blocks`` (training) and ``heldout_blocks``, ``tokens``
        (trained), ``steps``, ``seconds`` (wall), ``cpu_seconds`` (this process's CPU time, all
        threads), ``history`` (per evaluation: ``step``, ``tokens``, the mean training ``loss``
        (next token) and ``kl`` since the previous one, held-out ``perplexity``), ``best_step``,
        ``initial_perplexity``, ``metric`` (``"perplexity"``), ``eval`` (the kept state's held-out
        ``perplexity``, ``nll``, ``n``, ``tokens``) and ``stopped`` (why the run ended early, or ``None``).

    Raises:
        ModelError: for a model that is not a causal LM, has no tokenizer or nothing to train.
        DataError: for a text that gives fewer than two blocks.
        FwsvdError: for ``distill`` without a teacher.
    """
    if loaded.task != "causal-lm":
        raise ModelError(f"{loaded.source} is a {loaded.task} model, not a causal LM")
    if loaded.tokenizer is None:
        raise ModelError(f"{loaded.source} has no tokenizer: save the tokenizer files into the model folder")
    model = loaded.model
    compressed = is_compressed(model)
    cfg, teacher = _causal_settings(config, compressed, teacher)
    assert cfg.lr is not None and cfg.batch_size is not None and cfg.max_length is not None and cfg.train is not None
    heldout, train, generator = _split_blocks(loaded.tokenizer, cfg)
    total, every = _causal_steps(cfg, len(train))

    ranks_before = _low_rank_ranks(model)
    was_training = model.training
    frozen = _select_trainable(model, cfg.train)
    start, cpu_start = time.perf_counter(), time.process_time()
    opt: _Optimization | None = None
    try:
        opt = _optimization(model, cfg, total)
        trainable = sum(p.numel() for p in opt.params)
        device = opt.params[0].device  # blocks follow the model (CPU unless the caller moved it)
        heldout, train = heldout.to(device), train.to(device)
        logger.info(
            "recovery of a %s causal LM on %s: %d blocks of %d tokens (%d held out), %d steps of %d blocks, lr %g, "
            "training %s (%s parameters)%s",
            "compressed" if compressed else "dense", cfg.data, len(train), cfg.max_length, len(heldout), total, cfg.batch_size, cfg.lr,
            cfg.train, f"{trainable:,}", ", distilled from the dense model" if teacher is not None else "",
        )
        run = _recover(model, train, heldout, teacher, opt, generator, cfg, total, every, progress)
        _restore_best_state(run, opt.params)
    finally:
        if opt is not None:
            opt.optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
        _restore_trainable(frozen)
    _check_trained(model, ranks_before)
    summary = _causal_summary(cfg, run, train, heldout, trainable, compressed, total, every, start, cpu_start)
    _record(model, summary)
    return summary


def _causal_settings(config: FinetuneConfig, compressed: bool, teacher: nn.Module | None) -> tuple[FinetuneConfig, nn.Module | None]:
    """The config with the causal-LM defaults filled in and ``distill`` decided, and the teacher if it is used.

    Raises:
        FwsvdError: for ``distill`` without a teacher.
    """
    cfg = config.resolved(compressed, "causal-lm")
    if cfg.distill and teacher is None:
        raise FwsvdError("distillation needs the dense model as the teacher (fwsvd compress keeps it in memory for --finetune-distill)")
    distill = (DEFAULT_DISTILL and teacher is not None) if cfg.distill is None else cfg.distill
    return replace(cfg, distill=distill), teacher if distill else None


def _split_blocks(tokenizer: Any, cfg: FinetuneConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """The held-out and training blocks of the text, and the seeded generator that split them (it then orders the batches).

    Raises:
        DataError: for a text that gives fewer than two blocks.
    """
    assert cfg.max_length is not None
    blocks = d.causal_blocks_from_file(tokenizer, cfg.data, cfg.max_length, samples=cfg.limit, seed=cfg.seed)
    n = int(blocks.shape[0])
    if n < 2:
        raise DataError(
            f"{cfg.data} gives {n} block of {cfg.max_length} tokens: recovery needs at least 2 (one is held out); "
            "pass a longer text or a smaller --max-length"
        )
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n, generator=generator)
    n_hold = min(max(1, round(cfg.holdout * n)), MAX_HOLDOUT_BLOCKS, n - 1)
    return blocks[order[:n_hold].sort().values], blocks[order[n_hold:].sort().values], generator


def _causal_steps(cfg: FinetuneConfig, n_train: int) -> tuple[int, int]:
    """Training steps of the run, and steps between held-out evaluations."""
    assert cfg.batch_size is not None and cfg.max_length is not None
    if cfg.tokens is not None:
        total = max(1, math.ceil(cfg.tokens / (cfg.batch_size * cfg.max_length)))
        return total, cfg.eval_steps or math.ceil(total / _EVALUATIONS)
    assert cfg.epochs is not None
    per_epoch = math.ceil(n_train / cfg.batch_size)
    return per_epoch * cfg.epochs, cfg.eval_steps or per_epoch


@dataclass
class _CausalRun:
    """Where a causal-LM recovery run stands: the held-out history, the best state, the running training loss."""

    initial_nll: float
    best_nll: float
    best_state: list[torch.Tensor] | None  # None: the best state is the model's own (the last step's)
    best_step: int = 0
    step: int = 0
    seen: int = 0  # tokens trained on
    stopped: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    # Sums of the training loss and KL over the steps since the last evaluation.
    loss_sum: float = 0.0
    kl_sum: float = 0.0
    count: int = 0


def _recover(
    model: nn.Module, train: torch.Tensor, heldout: torch.Tensor, teacher: nn.Module | None, opt: _Optimization,
    generator: torch.Generator, cfg: FinetuneConfig, total: int, every: int, progress: bool,
) -> _CausalRun:
    """Train ``total`` steps on ``train``, evaluating on ``heldout`` at step 0, every ``every`` steps and at the end."""
    assert cfg.batch_size is not None
    initial_nll = _heldout_nll(model, heldout, cfg.batch_size)
    # The starting state is a candidate too: a run that only makes things worse is undone.
    run = _CausalRun(initial_nll, initial_nll, [p.detach().clone() for p in opt.params])
    run.history.append({"step": 0, "tokens": 0, "loss": None, "kl": None, "perplexity": _perplexity(initial_nll)})
    logger.info("held-out perplexity before training: %.3f", metrics.perplexity(initial_nll, 1))
    batches = _block_batches(len(train), cfg.batch_size, generator)
    bar = tqdm(total=total, desc="recovery", unit="step", disable=not progress, leave=False)
    model.train()
    # Dropout (where a model has any) draws from torch's global generator: fork it so the run
    # is seeded without changing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for step in range(1, total + 1):
            run.step = step
            ids = train[next(batches)]
            loss, nll, kl = _accumulate_gradients(model, ids, teacher)
            if not torch.isfinite(loss):
                run.stopped = f"the training loss became {loss.item()} at step {step}: lower the learning rate (now {cfg.lr:g})"
                logger.warning("%s; keeping the best state so far", run.stopped)
                break
            opt.step()
            run.seen += ids.numel()
            run.loss_sum, run.kl_sum, run.count = run.loss_sum + nll, run.kl_sum + (kl or 0.0), run.count + 1
            bar.update(1)
            bar.set_postfix(loss=f"{run.loss_sum / run.count:.4f}", **({"kl": f"{run.kl_sum / run.count:.4f}"} if kl is not None else {}))
            if step % every and step != total:
                continue
            _heldout_checkpoint(model, heldout, run, opt.params, cfg.batch_size, total, teacher is not None)
    bar.close()
    return run


def _accumulate_gradients(model: nn.Module, ids: torch.Tensor, teacher: nn.Module | None) -> tuple[torch.Tensor, float, float | None]:
    """Backpropagate a batch's loss; returns the last block's loss and the batch's next-token loss and KL.

    A non-finite loss stops the accumulation (the loss returned is that one).
    """
    nll, kl = 0.0, None if teacher is None else 0.0
    # One block at a time, gradients accumulated: every block has the same number of
    # predicted tokens, so this is the batch's mean loss, while the activations and the
    # vocabulary-wide logits (and the teacher's) are held for one block only.
    for block in ids.split(_MICRO_BATCH):
        loss, part_nll, block_kl = _causal_loss(model, block, teacher, DISTILL_WEIGHT)
        if not torch.isfinite(loss):
            break
        (loss * (len(block) / len(ids))).backward()
        nll += part_nll * len(block) / len(ids)
        if kl is not None and block_kl is not None:
            kl += block_kl * len(block) / len(ids)
    return loss, nll, kl


def _heldout_nll(model: nn.Module, heldout: torch.Tensor, batch_size: int) -> float:
    """The mean next-token loss on the held-out blocks, in eval mode; the model is left in train mode."""
    model.eval()
    try:
        return block_nll(model, heldout, batch_size)
    finally:
        model.train()


def _heldout_checkpoint(
    model: nn.Module, heldout: torch.Tensor, run: _CausalRun, params: list[nn.Parameter], batch_size: int, total: int, distilled: bool
) -> None:
    """Evaluate on the held-out blocks at ``run.step``: add a history row and keep the state if it is the best."""
    step = run.step
    nll_now = _heldout_nll(model, heldout, batch_size)
    row = {
        "step": step, "tokens": run.seen, "loss": run.loss_sum / run.count, "kl": run.kl_sum / run.count if distilled else None,
        "perplexity": _perplexity(nll_now),
    }
    run.history.append(row)
    run.loss_sum, run.kl_sum, run.count = 0.0, 0.0, 0
    logger.info("step %d/%d: training loss %.4f, held-out perplexity %.3f", step, total, row["loss"], metrics.perplexity(nll_now, 1))
    # A state is kept only when its loss and every weight are finite.
    if math.isfinite(nll_now) and nll_now < run.best_nll and all(bool(torch.isfinite(p).all()) for p in params):
        run.best_nll, run.best_step = nll_now, step
        # No copy of the last state: nothing comes after it.
        run.best_state = None if step == total else [p.detach().clone() for p in params]


def _restore_best_state(run: _CausalRun, params: list[nn.Parameter]) -> None:
    """Put the best state back into ``params`` unless the model is in it (the run ended on its best step)."""
    if run.best_state is not None and (run.stopped is not None or run.best_step != run.step):
        with torch.no_grad():
            for p, saved in zip(params, run.best_state):
                p.copy_(saved)
        logger.info("kept the state of step %d (held-out perplexity %.3f)", run.best_step, metrics.perplexity(run.best_nll, 1))


def _causal_summary(
    cfg: FinetuneConfig, run: _CausalRun, train: torch.Tensor, heldout: torch.Tensor, trainable: int, compressed: bool,
    total: int, every: int, start: float, cpu_start: float,
) -> dict[str, Any]:
    """The summary :func:`finetune_causal` returns (the times run from ``start`` / ``cpu_start``)."""
    return {
        "task": "causal-lm",
        "data": cfg.data,
        "blocks": len(train),
        "heldout_blocks": len(heldout),
        "epochs": cfg.epochs,
        "token_budget": cfg.tokens,
        "tokens": run.seen,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "seed": cfg.seed,
        "limit": cfg.limit,
        "warmup": cfg.warmup,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "distill": bool(cfg.distill),
        "distill_weight": DISTILL_WEIGHT if cfg.distill else None,
        "train": cfg.train,
        "trainable_parameters": trainable,
        "compressed": compressed,
        "steps": total,
        "eval_steps": every,
        "seconds": round(time.perf_counter() - start, 3),
        "cpu_seconds": round(time.process_time() - cpu_start, 3),
        "history": run.history,
        "best_step": run.best_step,
        "initial_perplexity": _perplexity(run.initial_nll),
        "metric": "perplexity",
        "eval": {"perplexity": metrics.perplexity(run.best_nll, 1), "nll": run.best_nll, "n": len(heldout), "tokens": int(heldout[:, 1:].numel())},
        "stopped": run.stopped,
    }


def _record(model: nn.Module, summary: dict[str, Any]) -> None:
    """Write a compact record of the run into the model config (``config.json`` once saved)."""
    record = {k: v for k, v in summary.items() if k not in ("history", "eval")}
    if summary.get("task") == "causal-lm":
        record["perplexity"] = _perplexity(summary["eval"]["nll"])
        record["history"] = [{k: round(v, 6) if isinstance(v, float) else v for k, v in h.items()} for h in summary["history"]]
    else:
        record["history"] = [
            {"epoch": h["epoch"], "loss": round(h["loss"], 6), **({h["eval"]["metric"]: h["eval"][h["eval"]["metric"]]} if "eval" in h else {})}
            for h in summary["history"]
        ]
    from ..version import __version__

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

