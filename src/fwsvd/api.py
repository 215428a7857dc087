"""The small public API: calibrate, compress, save, load, inspect.

Typical use::

    import fwsvd
    lm = fwsvd.load_model("my-bert-sst2")
    config = fwsvd.CompressConfig(method="fwsvd", keep=0.3)
    stats = fwsvd.calibrate(lm, fwsvd.CalibrationConfig(data="train.tsv"), config.needs(lm.task))
    report = fwsvd.compress(lm.model, config, stats, task=lm.task)
    fwsvd.save(lm.model, "out", tokenizer=lm.tokenizer)
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .core import Decomposition, allocate_ranks, dense_parameters, factorized_parameters, rank_for_kept_fraction, round_ranks
from .errors import DataError, FwsvdError, ModelError
from .fsutil import atomic_dir
from .hf import FwsvdQuantizationConfig, compression_record
from .methods import METHODS, Method, get_method
from .models import TASKS, LoadedModel, dtype_name, load_model
from .nn import FACTORS, LinearInfo, LowRankLinear, check_finite_weights, find_targets, linear_bias, linear_weight, swap_module
from .resume import Checkpointing
from .stats import Statistics, collect_statistics

logger = logging.getLogger(__name__)

__all__ = [
    "CalibrationConfig",
    "CompressConfig",
    "CompressionReport",
    "LayerReport",
    "calibrate",
    "calibration_batches",
    "cast_factors",
    "cast_weights",
    "check_finite",
    "layer_errors",
    "check_statistics",
    "compress",
    "count_parameters",
    "factorize_targets",
    "help_field",
    "inspect",
    "load",
    "load_statistics",
    "record_compression",
    "refuse_compressed",
    "save",
]


#: Rank allocation modes (see :func:`fwsvd.core.allocate_ranks`).
ALLOCATIONS = ("auto", "uniform", "global")
#: ``auto`` takes the method's own default (:attr:`Method.default_allocation`): global for fwsvd,
#: whose Fisher estimate prices components across layers; uniform for the others, as published.
#: Global allocation is fwsvd's default by measurement (README, benchmarks/results): fwsvd on
#: SmolLM2-135M, WikiText-2 perplexity at keep 0.8 / 0.6, 40.8 / 67 against 62.6 / 125 with uniform
#: ranks (dense 27.4); MiniLM-L6 SST-2 dev accuracy with rank floor 0.5, keep 0.8 / 0.5 / 0.3,
#: 0.876 / 0.870 / 0.852 against 0.880 / - / 0.843 uniform.
DEFAULT_ALLOCATION = "auto"
#: A floor of half the uniform rank: at 0.25 the encoder's last layers fell to their floor and
#: accuracy dropped (keep 0.8: 0.873, keep 0.3: 0.848 against 0.876 / 0.852 at 0.5), while the
#: decoder barely noticed (keep 0.8: 40.4 against 40.8).
DEFAULT_RANK_FLOOR = 0.5
#: dtypes a compressed model's weights may be stored in (``None``: the model's own).
STORAGE_DTYPES = ("float32", "bfloat16", "float16")
#: The name of :data:`STORAGE_DTYPES` from when ``--dtype`` cast only the low-rank factors.
FACTOR_DTYPES = STORAGE_DTYPES


def help_field(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class CompressConfig:
    """What to compress and how. Every field's help text is reused by the command line."""

    method: str = help_field(f"compression method: {', '.join(METHODS)}", default="fwsvd")
    keep: float = help_field(
        "fraction of the targeted layers' parameters that STAYS after factorization, in (0, 1]; "
        "e.g. 0.3 keeps 30 percent and removes 70 percent",
        default=0.5,
    )
    include: tuple[str, ...] = help_field("glob/regex patterns of module names to target instead of the transformer blocks' linears", default=())
    exclude: tuple[str, ...] = help_field("glob/regex patterns of module names to leave dense", default=())
    fisher_reduction: str = help_field(
        "fwsvd: reduce Fisher to one weight per output feature ('out'), input feature ('in'), both, or 'auto' "
        "(out with whitened inputs; without whitening the measured best per task: out for encoders, both for causal LMs)",
        default="auto",
    )
    fisher_whiten: str = help_field(
        "fwsvd: weight the input side by the calibration inputs' covariance (SVD-LLM's truncation-aware whitening) "
        "on top of Fisher per output feature: on, off, or 'auto' (on unless --fisher-reduction in/both; measured best on encoders and decoders)",
        default="auto",
    )
    allocation: str = help_field(
        "how ranks are chosen: 'uniform' (every targeted layer keeps --keep of its parameters), 'global' "
        "(one budget for all layers, spent where the method's loss estimate says components matter most; "
        "every layer keeps at least --rank-floor of its uniform rank), or 'auto' (global for fwsvd, measured best; "
        "uniform for the other methods)",
        default=DEFAULT_ALLOCATION,
    )
    rank_floor: float = help_field("global allocation: the smallest rank a layer may get, as a fraction of its uniform rank", default=DEFAULT_RANK_FLOOR)
    dense_above: float = help_field(
        "global allocation: a layer whose rank would pass this fraction of its break-even rank out*in/(out+in) stays dense "
        "and the others share its budget; near break-even two thin products save few parameters and run slower than one "
        "dense product (benchmarks/kernels.py measures where on a CPU); 1 keeps dense only layers that would save nothing",
        default=1.0,
    )
    rank_multiple: int = help_field(
        "round every rank to a multiple of this (matrix kernels run fastest on widths that fill their vector registers and "
        "blocks; benchmarks/kernels.py measures which) without holding more parameters in total than unrounded ranks; "
        "with any allocation; 1: off",
        default=1,
    )
    # Off by default, by measurement: on SmolLM2-135M (keep 0.8, 16 x 512 calibration tokens) an
    # in-sample refit lowered every layer's calibration error yet raised test perplexity from 40.79
    # (sequential, no refit) to 62.64; judged on held-out batches (what it does now) 41.97.
    refit: bool = help_field(
        "sequential mode: refit each layer's left factor in closed form to the dense model's outputs on the inputs the "
        "compressed earlier blocks produce, taken only as far as it lowers the layer's error on held-out calibration "
        "batches (off by default: it did not lower the decoder benchmark's perplexity)",
        default=False,
    )
    asvd_alpha: float = help_field("asvd: exponent of the mean absolute activation scaling", default=0.5)
    damping: float = help_field("svd-llm and whitened fwsvd: damping added to the covariance, as a fraction of its mean diagonal", default=0.01)
    dtype: str | None = help_field(
        f"dtype every floating-point weight of the compressed model is stored in: {', '.join(STORAGE_DTYPES)} (default: the "
        "model's own). bfloat16/float16 halve the saved folder; fwsvd.load and the fwsvd commands compute in float32 again, "
        "from_pretrained(dtype='auto') in the stored dtype",
        default=None,
    )

    def __post_init__(self) -> None:
        self.include = tuple(self.include or ())
        self.exclude = tuple(self.exclude or ())
        if self.method not in METHODS:
            raise FwsvdError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not math.isfinite(self.keep) or not 0 < self.keep <= 1:
            raise FwsvdError(f"--keep {self.keep!r} must be a fraction in (0, 1]: the share of the targeted parameters that stays")
        if self.allocation not in ALLOCATIONS:
            raise FwsvdError(f"--allocation {self.allocation!r} must be one of {', '.join(ALLOCATIONS)}")
        if isinstance(self.rank_floor, bool) or not isinstance(self.rank_floor, (int, float)) or not 0 <= self.rank_floor <= 1:
            raise FwsvdError(f"--rank-floor {self.rank_floor!r} must be a fraction in [0, 1] of each layer's uniform rank")
        if isinstance(self.dense_above, bool) or not isinstance(self.dense_above, (int, float)) or not 0 < self.dense_above <= 1:
            raise FwsvdError(f"--dense-above {self.dense_above!r} must be a fraction in (0, 1] of each layer's break-even rank (1: off)")
        if isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, int) or not 1 <= self.rank_multiple <= 4096:
            raise FwsvdError(f"--rank-multiple {self.rank_multiple!r} must be a whole number from 1 (off) to 4096, e.g. 8 or 16")
        if self.dense_above < 1 and self.resolved_allocation() != "global":
            raise FwsvdError(
                f"--dense-above {self.dense_above:g} applies to global allocation, but {self.method} allocates "
                f"{self.resolved_allocation()}: pass --allocation global, or drop --dense-above"
            )
        if self.dtype is not None and self.dtype not in STORAGE_DTYPES:
            raise FwsvdError(f"--dtype {self.dtype!r} must be one of {', '.join(STORAGE_DTYPES)}")
        self.build_method("sequence-classification")  # validates the method's options early

    def resolved_allocation(self) -> str:
        """``uniform`` or ``global``: ``auto`` resolved by the method."""
        if self.allocation != "auto":
            return self.allocation
        return METHODS[self.method].default_allocation

    def needs(self, task: str) -> frozenset[str]:
        """The statistics kinds to calibrate for this config on ``task`` (pass them to :func:`calibrate`)."""
        return self.build_method(task).needs_for(task)

    def build_method(self, task: str) -> Method:
        """The configured method, with ``auto`` options resolved for ``task``."""
        return get_method(self.method, reduction=self.fisher_reduction, whiten=self.fisher_whiten, alpha=self.asvd_alpha, damping=self.damping).configure(task)


@dataclass
class CalibrationConfig:
    """Which calibration data to use and how to batch it."""

    data: str | None = help_field("calibration data: .tsv/.csv/.jsonl with labels, .txt for causal LMs, or a datasets hub name", default=None)
    samples: int | None = help_field("calibration rows (classification, default 512) or token blocks (causal LM, default 32)", default=None)
    batch_size: int | None = help_field(
        "calibration batch size: memory and speed only, the statistics do not depend on it "
        "(default 16 rows; 4 blocks for causal LMs, whose Fisher backward through the vocabulary is large)",
        default=None,
    )
    max_length: int | None = help_field("tokens per example (default 128) or per causal-LM block (default 512)", default=None)
    seed: int = help_field("seed for drawing the calibration samples", default=0)
    text_column: str | None = help_field("name of the text column (detected when omitted)", default=None)
    pair_column: str | None = help_field("name of the second text column of a pair task (detected when omitted)", default=None)
    label_column: str | None = help_field("name of the label column (detected when omitted)", default=None)
    low_memory: bool = help_field(
        "calibrate one transformer block at a time (the same statistics; the block-boundary states wait on disk), "
        "so memory holds one block's activations instead of the whole model's, and a causal LM's logits a few tokens at a time; "
        "batches default to 1 example",
        default=False,
    )

    def __post_init__(self) -> None:
        for name in ("samples", "batch_size", "max_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise FwsvdError(f"--{name.replace('_', '-')} {value!r} must be a positive integer")

    def resolved(self, task: str) -> CalibrationConfig:
        causal = task == "causal-lm"
        return CalibrationConfig(
            data=self.data,
            samples=self.samples or (32 if causal else 512),
            # With low_memory, blocks run one example at a time unless asked otherwise: a block's
            # working set grows with the batch, and there is no whole-model pass to amortize.
            batch_size=self.batch_size or (1 if self.low_memory else 4 if causal else 16),
            max_length=self.max_length or (512 if causal else 128),
            seed=self.seed,
            text_column=self.text_column,
            pair_column=self.pair_column,
            label_column=self.label_column,
            low_memory=self.low_memory,
        )


@dataclass
class LayerReport:
    """One targeted layer before and after compression."""

    name: str
    shape: tuple[int, int]
    rank: int | None  # None: kept dense (factorizing would not save parameters)
    parameters_before: int
    parameters_after: int
    seconds: float


@dataclass
class CompressionReport:
    """What :func:`compress` did, with whole-model and targeted-layer figures."""

    method: str
    keep: float
    layers: list[LayerReport]
    parameters_before: int
    parameters_after: int
    calibration: dict[str, Any]
    seconds_factorize: float
    method_options: dict[str, Any] = field(default_factory=dict)

    @property
    def target_parameters_before(self) -> int:
        return sum(r.parameters_before for r in self.layers)

    @property
    def target_parameters_after(self) -> int:
        return sum(r.parameters_after for r in self.layers)

    @property
    def target_keep(self) -> float:
        return self.target_parameters_after / self.target_parameters_before

    @property
    def model_keep(self) -> float:
        return self.parameters_after / self.parameters_before

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "method_options": self.method_options,
            "keep": self.keep,
            "target_keep": self.target_keep,
            "model_keep": self.model_keep,
            "parameters": self.parameters_after,
            "dense_parameters": self.parameters_before,
            "target_parameters": self.target_parameters_after,
            "target_dense_parameters": self.target_parameters_before,
            "seconds_calibration": self.calibration.get("seconds", 0.0),
            "seconds_factorize": self.seconds_factorize,
            "calibration": self.calibration,
            "layers": [asdict(r) for r in self.layers],
        }


def count_parameters(model: nn.Module) -> int:
    """Parameters of a model, each shared (tied) tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def calibration_batches(loaded: LoadedModel, config: CalibrationConfig, *, labels: bool = True) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """Tokenized calibration batches for the model's task, and a summary of where they came from.

    Raises:
        DataError: for missing, empty or unusable data.
        ModelError: when the model has no tokenizer.
    """
    from . import data as d

    if config.data is None:
        raise DataError("this method needs calibration data: pass --data with a training file")
    if loaded.tokenizer is None:
        raise ModelError(f"{loaded.source} has no tokenizer: save the tokenizer files into the model folder")
    cfg = config.resolved(loaded.task)
    tok = loaded.tokenizer
    summary: dict[str, Any] = {"data": str(cfg.data), "seed": cfg.seed, "max_length": cfg.max_length, "batch_size": cfg.batch_size}
    if loaded.task == "causal-lm":
        ids = d.causal_blocks(tok, d.read_text(cfg.data), cfg.max_length, samples=cfg.samples, seed=cfg.seed)
        batches = [
            {"input_ids": chunk, "attention_mask": torch.ones_like(chunk), **({"labels": chunk} if labels else {})}
            for chunk in ids.split(cfg.batch_size)
        ]
        return batches, summary
    if loaded.task == "token-classification":
        examples = d.read_token_labelled(cfg.data)
        keep = d.draw(len(examples), cfg.samples, cfg.seed)
        mc = loaded.model.config
        items, targets = d.encode_token_examples(
            tok, examples.subset(keep), cfg.max_length, num_labels=mc.num_labels, label2id=getattr(mc, "label2id", None)
        )
        return list(d.batches(items, cfg.batch_size, tok.pad_token_id, labels=targets if labels else None)), summary
    examples = d.read_labelled(cfg.data, text_column=cfg.text_column, pair_column=cfg.pair_column, label_column=cfg.label_column)
    keep = d.draw(len(examples), cfg.samples, cfg.seed)
    examples = _subset(examples, keep)
    items = d.encode_examples(tok, examples, cfg.max_length)
    targets = None
    if labels:
        if examples.labels is None:
            raise DataError(f"{cfg.data} has no label column: Fisher calibration needs labels (or pass --label-column)")
        mc = loaded.model.config
        targets, _, _ = d.label_mapping(
            examples.labels,
            label2id=getattr(mc, "label2id", None),
            num_labels=mc.num_labels,
            regression=(mc.problem_type == "regression") or mc.num_labels == 1,
            source=str(cfg.data),
        )
    return list(d.batches(items, cfg.batch_size, tok.pad_token_id, labels=targets)), summary


def _subset(examples: Any, keep: list[int]) -> Any:
    from dataclasses import replace

    pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
    return replace(examples, texts=pick(examples.texts), text_pairs=pick(examples.text_pairs), labels=pick(examples.labels))


def calibrate(
    loaded: LoadedModel,
    config: CalibrationConfig,
    kinds: set[str] | frozenset[str],
    *,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    keep_full_fisher: bool = False,
    progress: bool = True,
    checkpoint: Checkpointing | None = None,
) -> Statistics:
    """Collect the statistics ``kinds`` for the targeted layers in one pass over the calibration data.

    Under ``torchrun`` (see :mod:`fwsvd.distributed`) each process calibrates on its share of the
    batches and every process gets the sums over all of them. With ``checkpoint`` the running sums
    are saved every few batches, and a run with the same settings resumes from them
    (:mod:`fwsvd.resume`).
    """
    from . import distributed

    targets = find_targets(loaded.model, include, exclude)
    names = [t.name for t in targets]
    need_labels = "fisher" in kinds
    batches, summary = calibration_batches(loaded, config, labels=need_labels)
    summary["task"] = loaded.task
    ctx = distributed.current()
    if config.low_memory:
        if ctx.active:
            raise FwsvdError("--low-memory calibrates in one process: run it without torchrun")
        from .streaming import stream_statistics_in_scratch

        return stream_statistics_in_scratch(
            loaded.model, names, batches, kinds, keep_full_fisher=keep_full_fisher, task=loaded.task, progress=progress, summary=summary
        )
    if ctx.active:
        summary["processes"] = ctx.world_size
    mine = distributed.shard(batches)
    start = save = None
    if checkpoint is not None:
        from .resume import fingerprint

        facts = fingerprint(
            model=loaded.model, source=loaded.source, task=loaded.task, calibration=asdict(config.resolved(loaded.task)),
            kinds=kinds, targets=names, keep_full_fisher=keep_full_fisher, ctx=ctx,
        )
        start, save = checkpoint.begin(facts, ctx, total=len(mine))
    return collect_statistics(
        loaded.model,
        names,
        mine[start.batches if start is not None else 0 :],
        kinds,
        keep_full_fisher=keep_full_fisher,
        task=loaded.task,
        total=len(mine),
        progress=progress,
        summary=summary,
        start=start,
        checkpoint=save,
        reduce=distributed.reduce_sums,
    )


def compress(
    model: nn.Module,
    config: CompressConfig,
    statistics: Statistics | None = None,
    *,
    task: str = "sequence-classification",
    progress: bool = True,
) -> CompressionReport:
    """Factorize the targeted linear layers of ``model`` in place.

    Each targeted layer gets the rank whose factors keep ``config.keep`` of its parameters (see
    :func:`fwsvd.core.rank_for_kept_fraction`); a layer whose factorization would not save
    parameters stays dense. The compression record is stored in ``model.config`` so that
    :func:`save` writes it to ``config.json``.

    Args:
        model: a transformers model (dense).
        config: method and budget.
        statistics: calibration statistics, required when the method needs any.
        task: model task (resolves ``auto`` method options).
        progress: show a progress bar over layers.

    Returns:
        A :class:`CompressionReport`.

    Raises:
        FwsvdError: on an already-compressed model, missing statistics, or non-finite weights.
    """
    if task not in TASKS:
        raise FwsvdError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    refuse_compressed(model)
    method = config.build_method(task)
    needs = method.needs_for(task)
    have = statistics.kinds if statistics is not None else frozenset()
    if needs - have:
        if statistics is None:
            raise FwsvdError(f"method {method.name} needs calibration statistics {sorted(needs - have)}: pass --data")
        raise FwsvdError(
            f"the given statistics hold {sorted(have)} but method {method.name} ({method.options()}) also needs "
            f"{sorted(needs - have)}: recalibrate with --data, or save them with --save-stats from a run of this method"
        )
    targets = find_targets(model, config.include, config.exclude)
    check_finite(model, targets)
    if statistics is not None:
        check_statistics(statistics, targets)
    uncovered = statistics.uncovered([t.name for t in targets], needs) if statistics is not None else []
    if uncovered:
        raise FwsvdError(
            f"the calibration statistics do not cover {len(uncovered)} targeted layers (e.g. {uncovered[0]}): "
            "recalibrate with the same --include/--exclude, or drop --stats"
        )
    before = count_parameters(model)
    start = time.perf_counter()
    ranks = decompositions = None
    if config.resolved_allocation() == "global":
        ranks, decompositions = allocate(model, targets, method, config.keep, statistics, floor=config.rank_floor, dense_above=config.dense_above, progress=progress)
    ranks = rounded_ranks(targets, config, ranks)
    rows = factorize_targets(model, targets, method, config.keep, statistics, ranks=ranks, decompositions=decompositions, progress=progress)
    return record_compression(
        model,
        config,
        method,
        rows,
        parameters_before=before,
        calibration=dict(statistics.summary) if statistics is not None else {},
        seconds=time.perf_counter() - start,
    )


def refuse_compressed(model: nn.Module) -> None:
    """Raise :class:`FwsvdError` when ``model`` already holds low-rank layers or a compression record."""
    if compression_record(getattr(model, "config", None)) is not None or any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise FwsvdError("this model is already compressed: compress the original dense model instead")


@contextlib.contextmanager
def layer_errors(name: str) -> Iterator[None]:
    """Turn the math core's ``ValueError`` (a statistic it cannot use: negative importance, an indefinite
    covariance) into one line that names the layer and the fix."""
    try:
        yield
    except ValueError as err:
        raise FwsvdError(f"cannot factorize {name}: {err}; recalibrate with --data, or pass statistics saved from this model") from err


def check_finite(model: nn.Module, targets: list[LinearInfo] | None = None) -> None:
    """Raise :class:`ModelError` when a weight of ``model`` (anywhere, not only the targets) holds NaN or infinite values.

    ``targets`` is accepted for compatibility; every parameter and floating-point buffer is checked,
    since a NaN in a layer norm or an embedding spoils the compressed model as surely as one in a
    factorized weight.
    """
    check_finite_weights(model)


def factorize_targets(
    model: nn.Module,
    targets: list[LinearInfo],
    method: Method,
    keep: float,
    statistics: Statistics | None,
    *,
    ranks: Mapping[str, int | None] | None = None,
    decompositions: dict[str, Decomposition] | None = None,
    correct: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]] | None = None,
    progress: bool = True,
) -> list[LayerReport]:
    """Swap each of ``targets`` for a :class:`LowRankLinear` that keeps ``keep`` of its parameters.

    The shared per-layer step of :func:`compress` and :func:`fwsvd.sequential.compress_sequential`.
    A layer whose factorization would not save parameters stays dense (rank ``None`` in its row).

    Args:
        ranks: the rank of each target (``None``: stays dense), e.g. from :func:`allocate`; when
            omitted every layer gets its uniform rank for ``keep``.
        decompositions: decompositions already made (by :func:`allocate`), consumed (popped) here
            so that each is freed as soon as its layer is swapped.
        correct: ``(weight, A, B, stats) -> (A, B)`` applied to each layer's factors before the
            swap (sequential mode's refit).

    Returns:
        One :class:`LayerReport` per target, in the order given.
    """
    from .distributed import spread

    chosen: dict[str, int | None] = {}
    for info in targets:
        chosen[info.name] = ranks[info.name] if ranks is not None else rank_for_kept_fraction(info.out_features, info.in_features, keep, bias=info.bias)

    def factorize(info: LinearInfo) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        rank = chosen[info.name]
        if rank is None:
            return []
        weight = linear_weight(model.get_submodule(info.name)).detach()
        stats = statistics.for_module(info.name) if statistics is not None else {}
        with torch.no_grad():
            cached = decompositions.pop(info.name, None) if decompositions is not None else None
            with layer_errors(info.name):
                a, b = cached.truncate(rank) if cached is not None else method.factorize(weight, rank, stats)
            if correct is not None:
                a, b = correct(weight, a, b, stats)
        return [a.to(weight.dtype), b.to(weight.dtype), torch.tensor([time.perf_counter() - t0], dtype=torch.float64)]

    def like(info: LinearInfo) -> list[tuple[tuple[int, ...], torch.dtype]]:
        rank, dtype = chosen[info.name], linear_weight(model.get_submodule(info.name)).dtype
        if rank is None:
            return []
        return [((info.out_features, rank), dtype), ((rank, info.in_features), dtype), ((1,), torch.float64)]

    # Under torchrun each layer is factorized by one process (the one that decomposed it in
    # allocate, as both spread the same targets at the same costs) and its factors handed to all.
    rows: list[LayerReport] = []
    for info, factors in tqdm(spread(targets, factorize, like, decomposition_cost), total=len(targets), desc=f"{method.name} keep={keep:g}", unit="layer", disable=not progress, leave=False):
        dense = dense_parameters(info.out_features, info.in_features, info.bias)
        rank = chosen[info.name]
        if rank is None:
            rows.append(LayerReport(info.name, (info.out_features, info.in_features), None, dense, dense, 0.0))
            continue
        t0 = time.perf_counter()
        a, b, seconds = factors
        module = model.get_submodule(info.name)
        with torch.no_grad():
            bias = linear_bias(module)
            new = LowRankLinear.from_factors(a, b, None if bias is None else bias.detach())
        new.train(module.training)
        swap_module(model, info.name, new)
        rows.append(
            LayerReport(
                info.name,
                (info.out_features, info.in_features),
                rank,
                dense,
                factorized_parameters(info.out_features, info.in_features, rank, info.bias),
                round(float(seconds) + time.perf_counter() - t0, 4),
            )
        )
    return rows


def decomposition_cost(info: LinearInfo) -> float:
    """Relative cost of decomposing one layer (flops of an SVD of it plus an eigendecomposition of
    its input covariance), to share layers out evenly among processes."""
    out_f, in_f = info.out_features, info.in_features
    return float(out_f * in_f * min(out_f, in_f) + in_f**3)


def rounded_ranks(targets: list[LinearInfo], config: CompressConfig, ranks: Mapping[str, int | None] | None) -> dict[str, int | None] | None:
    """``ranks`` (``None``: each target's uniform rank for ``config.keep``) moved to multiples of
    ``config.rank_multiple`` by :func:`fwsvd.core.round_ranks`, within the same parameter total;
    ``ranks`` unchanged when the multiple is 1."""
    if config.rank_multiple == 1:
        return dict(ranks) if ranks is not None else None
    chosen = [
        ranks[t.name] if ranks is not None else rank_for_kept_fraction(t.out_features, t.in_features, config.keep, bias=t.bias)
        for t in targets
    ]
    shapes = [(t.out_features, t.in_features, t.bias) for t in targets]
    return {t.name: r for t, r in zip(targets, round_ranks(chosen, shapes, config.rank_multiple))}


def allocation_record(config: CompressConfig) -> dict[str, Any]:
    """The allocation as the compression record keeps it: the mode, for global its rules, and the rank multiple."""
    mode = config.resolved_allocation()
    rounding = {"rank_multiple": config.rank_multiple} if config.rank_multiple > 1 else {}
    if mode != "global":
        return {"mode": mode, **rounding}
    return {"mode": mode, "rank_floor": config.rank_floor, **({"dense_above": config.dense_above} if config.dense_above < 1 else {}), **rounding}


def allocate(
    model: nn.Module,
    targets: list[LinearInfo],
    method: Method,
    keep: float,
    statistics: Statistics | None,
    *,
    floor: float = DEFAULT_RANK_FLOOR,
    dense_above: float = 1.0,
    progress: bool = True,
) -> tuple[dict[str, int | None], dict[str, Decomposition]]:
    """Global rank allocation: decompose every target once, then share one parameter budget.

    Each layer's components are priced by :meth:`Method.component_loss` and
    :func:`fwsvd.core.allocate_ranks` keeps ``keep`` of all the targets' parameters where the
    estimated loss is largest. The decompositions are returned for the factorization to reuse, so
    every layer is decomposed once.

    Returns:
        ``({target name: rank or None}, {target name: decomposition})``; under ``torchrun`` the
        decompositions are those this process made (see :func:`fwsvd.distributed.spread`).
    """
    from .distributed import spread

    decompositions: dict[str, Decomposition] = {}

    def decompose(info: LinearInfo) -> list[torch.Tensor]:
        stats = statistics.for_module(info.name) if statistics is not None else {}
        with torch.no_grad():
            with layer_errors(info.name):
                dec = method.decompose(linear_weight(model.get_submodule(info.name)).detach(), stats)
            loss = method.component_loss(dec, stats).double()
        decompositions[info.name] = dec
        return [loss]

    # Under torchrun each layer is decomposed by one process (which keeps the decomposition) and
    # its component losses handed to all, so every process allocates the same ranks.
    like = lambda info: [((min(info.out_features, info.in_features),), torch.float64)]  # noqa: E731
    losses = [
        loss
        for _, (loss,) in tqdm(spread(targets, decompose, like, decomposition_cost), total=len(targets), desc=f"{method.name} allocate", unit="layer", disable=not progress, leave=False)
    ]
    shapes = [(info.out_features, info.in_features, info.bias) for info in targets]
    ranks = allocate_ranks(losses, shapes, keep, floor=floor, dense_above=dense_above)
    return {info.name: rank for info, rank in zip(targets, ranks)}, decompositions


def record_compression(
    model: nn.Module,
    config: CompressConfig,
    method: Method,
    rows: list[LayerReport],
    *,
    parameters_before: int,
    calibration: dict[str, Any],
    seconds: float,
) -> CompressionReport:
    """Build the :class:`CompressionReport` and store the compression record in ``model.config``."""
    report = CompressionReport(
        method=method.name,
        keep=config.keep,
        layers=rows,
        parameters_before=parameters_before,
        parameters_after=count_parameters(model),
        calibration=calibration,
        seconds_factorize=round(seconds, 3),
        method_options=method.options(),
    )
    record = report.to_dict()
    model.config.quantization_config = FwsvdQuantizationConfig(
        ranks={r.name: r.rank for r in rows if r.rank is not None},
        method=method.name,
        library_version=__version__,
        method_options=record["method_options"],
        keep=config.keep,
        include=list(config.include),
        exclude=list(config.exclude),
        dense_layers=[r.name for r in rows if r.rank is None],
        parameters=record["parameters"],
        dense_parameters=record["dense_parameters"],
        target_parameters=record["target_parameters"],
        target_dense_parameters=record["target_dense_parameters"],
        target_keep=record["target_keep"],
        calibration=record["calibration"],
        allocation=allocation_record(config),
    )
    if config.dtype is not None:
        cast_weights(model, config.dtype)
    logger.info("%s: kept %.3f of targeted parameters, %.3f of the model", method.name, report.target_keep, report.model_keep)
    return report


def _storage_target(model: nn.Module, dtype: str, caller: str) -> tuple[FwsvdQuantizationConfig, torch.dtype]:
    """The compression record of ``model`` and the torch dtype ``--dtype`` names, both checked."""
    if dtype not in STORAGE_DTYPES:
        raise FwsvdError(f"--dtype {dtype!r} must be one of {', '.join(STORAGE_DTYPES)}")
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if not isinstance(qc, FwsvdQuantizationConfig):
        raise FwsvdError(f"{caller} needs a model compressed by fwsvd (with its compression record)")
    return qc, getattr(torch, dtype)


def cast_weights(model: nn.Module, dtype: str) -> None:
    """Cast every floating-point weight of a compressed model to ``dtype``, as :func:`save` will store it.

    This is ``--dtype``: the parameters (a tied embedding and head once, still tied), the factors
    and the persistent buffers are cast, so a bfloat16 or float16 folder is half the float32 one;
    ``save_pretrained`` writes ``dtype`` as the config's ``dtype`` and the record says
    ``stored_dtype``. Like any Hugging Face model after ``model.to(dtype)``, the model then computes
    in ``dtype``. Non-persistent buffers (a rotary embedding's ``inv_freq``) are not saved and are
    rebuilt in float32 at load, so they keep their precision here too. Loading the folder with
    :func:`load` (or ``from_pretrained(path, dtype=torch.float32)``) computes in float32 with the
    rounded weights; ``from_pretrained(path)`` (``dtype="auto"``) in ``dtype``.

    Raises:
        FwsvdError: for a dtype not in :data:`STORAGE_DTYPES` or a model without a compression record.
    """
    qc, target = _storage_target(model, dtype, "cast_weights")
    # Factors rounded by --quantize-factors stay float32 (on their int8 grid): save writes them as int8.
    quantized = getattr(qc, "quantized_factors", None) is not None
    for module in model.modules():
        keep_factors = quantized and isinstance(module, LowRankLinear)
        for name, param in module.named_parameters(recurse=False):
            if keep_factors and name in FACTORS:
                continue
            if param.is_floating_point():
                param.data = param.data.to(target)  # in place on the Parameter: tied weights stay one object
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and name not in module._non_persistent_buffers_set:
                setattr(module, name, buffer.to(target))
    qc.stored_dtype = dtype
    if hasattr(qc, "factor_dtype"):
        del qc.factor_dtype  # superseded: the factors are stored in ``dtype`` with everything else


def cast_factors(model: nn.Module, dtype: str) -> None:
    """Store only the :class:`LowRankLinear` layers (factors and bias) in ``dtype``; the older form of ``--dtype``.

    Kept for scripts that used it: the embeddings, norms and dense layers stay in the model's dtype,
    so the folder does not halve (use :func:`cast_weights`). The layers compute in their inputs'
    dtype, so the model runs as before with the factors rounded; the record says ``factor_dtype``.

    Raises:
        FwsvdError: for a dtype not in :data:`STORAGE_DTYPES` or a model without a compression record.
    """
    qc, target = _storage_target(model, dtype, "cast_factors")
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            module.to(target)
    qc.factor_dtype = dtype


def _sync_stored_dtype(model: nn.Module) -> None:
    """Make the record's ``stored_dtype`` / ``factor_dtype`` say what saving ``model`` now writes.

    A bfloat16 folder loaded in float32 (what :func:`load` does) and saved again is float32: a
    record that still said bfloat16 would be wrong. :func:`save` calls this before writing.
    """
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if not isinstance(qc, FwsvdQuantizationConfig):
        return
    stored = getattr(qc, "stored_dtype", None)
    if stored is not None:
        # int8 factors (``quantized_factors``) are written as int8 whatever their dtype in memory.
        skip = tuple(f".{f}" for f in FACTORS) if getattr(qc, "quantized_factors", None) else ()
        dtypes = {dtype_name(t.dtype) for k, t in model.state_dict().items() if t.is_floating_point() and not (skip and k.endswith(skip))}
        if dtypes != {stored}:
            if len(dtypes) == 1 and next(iter(dtypes)) in STORAGE_DTYPES:
                qc.stored_dtype = next(iter(dtypes))
            else:
                del qc.stored_dtype
    factor = getattr(qc, "factor_dtype", None)
    if factor is not None:
        dtypes = {dtype_name(t.dtype) for m in model.modules() if isinstance(m, LowRankLinear) for t in m.state_dict().values()}
        if dtypes != {factor}:
            del qc.factor_dtype


#: Per-module tensors a statistics file may hold, and their shape for an ``[out, in]`` layer.
_STAT_SHAPES = {
    "fisher_out": lambda o, i: (o,),
    "fisher_in": lambda o, i: (i,),
    "fisher_full": lambda o, i: (o, i),
    "act_abs_mean": lambda o, i: (i,),
    "cov": lambda o, i: (i, i),
}


def load_statistics(path: str | Path) -> Statistics:
    """Read a statistics file written by ``--save-stats`` (:meth:`Statistics.save`), checking it first.

    The file may come from anywhere: it must be a safetensors file with fwsvd's metadata (format,
    shared-input map, summary with known kinds) and finite floating-point tensors named
    ``module::statistic``; nothing is unpickled.

    Raises:
        FwsvdError: naming what is wrong with the file.
    """
    import json

    from safetensors import SafetensorError, safe_open

    from .stats import _FORMAT, STAT_KINDS

    path = Path(path).expanduser()
    fix = "pass a file written by fwsvd compress --save-stats"
    if not path.is_file():
        raise FwsvdError(f"statistics file {path} does not exist: run a calibration with --save-stats first")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise FwsvdError(f"{path} is not an fwsvd statistics file (not safetensors: {str(err).splitlines()[0] if str(err) else type(err).__name__}): {fix}") from err
    if meta.get("format") != _FORMAT:
        raise FwsvdError(f"{path} is not an fwsvd statistics file (format {meta.get('format')!r}, expected {_FORMAT!r}): {fix}")
    parsed: dict[str, Any] = {}
    for key in ("shared", "summary"):
        if key not in meta:
            raise FwsvdError(f"statistics file {path} lacks its {key!r} metadata: {fix}")
        try:
            parsed[key] = json.loads(meta[key])
        except (json.JSONDecodeError, RecursionError) as err:
            raise FwsvdError(f"statistics file {path} has unreadable {key!r} metadata ({err}): {fix}") from err
    shared, summary = parsed["shared"], parsed["summary"]
    if not isinstance(shared, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in shared.items()):
        raise FwsvdError(f"statistics file {path}: 'shared' metadata is not a map of module names: {fix}")
    if not isinstance(summary, dict):
        raise FwsvdError(f"statistics file {path}: 'summary' metadata is not an object: {fix}")
    kinds = summary.get("kinds", [])
    if not isinstance(kinds, list) or not all(isinstance(k, str) and k in STAT_KINDS for k in kinds):
        raise FwsvdError(f"statistics file {path}: kinds {kinds!r} are not a list of {sorted(STAT_KINDS)}: {fix}")
    for key in keys:
        name, sep, stat = key.rpartition("::")
        if not sep or not name or stat not in _STAT_SHAPES:
            raise FwsvdError(f"statistics file {path} holds tensor {key[:80]!r}, not module::statistic with a known statistic: {fix}")
    try:
        statistics = Statistics.load(path)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        raise FwsvdError(f"cannot read statistics file {path} ({str(err).splitlines()[0] if str(err) else type(err).__name__}): {fix}") from err
    for name, stats in statistics.tensors.items():
        for stat, tensor in stats.items():
            problem = _statistic_problem(stat, tensor)
            if problem is not None:
                raise FwsvdError(f"statistic {stat} of {name} in {path} {problem}: {fix}")
    return statistics


#: Relative tolerance of the covariance checks: float32 sums of ``x xᵀ`` are symmetric and have a
#: non-negative diagonal exactly, so anything beyond round-off means the file was changed.
_COV_TOLERANCE = 1e-4


def _statistic_problem(stat: str, tensor: torch.Tensor) -> str | None:
    """What is wrong with one statistic read from a file (``None``: nothing).

    Shapes against the model are checked later (:func:`check_statistics`); here: floating point,
    finite, the Fisher sums and mean activations non-negative, a covariance square, symmetric, with a
    non-negative diagonal. Positive semi-definiteness itself is checked where the covariance is
    decomposed (:func:`fwsvd.core.whitened_decomposition`), which is the only place that can afford it.
    """
    if not tensor.is_floating_point():
        return f"is stored as {tensor.dtype}, not floating point"
    if not bool(torch.isfinite(tensor).all()):
        return "holds NaN or infinite values"
    if stat in ("fisher_out", "fisher_in", "fisher_full", "act_abs_mean") and bool((tensor < 0).any()):
        return f"holds negative values (smallest {tensor.min().item():.3g}), which a sum of squares or of magnitudes never has"
    if stat == "cov":
        if tensor.ndim != 2 or tensor.shape[0] != tensor.shape[1]:
            return f"has shape {list(tensor.shape)}, not a square matrix"
        cov = tensor.double()
        scale = cov.abs().max().item()
        if bool((cov.diagonal() < -_COV_TOLERANCE * scale).any()):
            return "has a negative diagonal entry, so it is not a covariance"
        if (cov - cov.T).abs().max().item() > _COV_TOLERANCE * scale:
            return "is not symmetric, so it is not a covariance"
    return None


def check_statistics(statistics: Statistics, targets: list[LinearInfo]) -> None:
    """Check that the statistics of each targeted layer have the shapes that layer implies.

    Raises:
        FwsvdError: when a statistic was computed on another model (a shape differs).
    """
    for info in targets:
        for stat, tensor in statistics.for_module(info.name).items():
            shape = _STAT_SHAPES.get(stat)
            expected = shape(info.out_features, info.in_features) if shape is not None else tuple(tensor.shape)
            if tuple(tensor.shape) != expected:
                raise FwsvdError(
                    f"the statistics do not fit this model: {stat} of {info.name} has shape {list(tensor.shape)} but the layer is "
                    f"{info.out_features}x{info.in_features} (expected {list(expected)}); they come from another model: "
                    "recalibrate with --data, or pass statistics saved from this model"
                )


def save(model: nn.Module, out: str | Path, tokenizer: Any = None, *, overwrite: bool = False) -> Path:
    """Write ``model`` (and ``tokenizer``) as a Hugging Face folder with safetensors weights, atomically.

    Raises:
        FwsvdError: when ``out`` exists, is not empty and ``overwrite`` is false.
    """
    from .quantize import storage_state_dict

    state = storage_state_dict(model)  # int8 factors and their scales, when the record says so and they are on their grid
    _sync_stored_dtype(model)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, **({"state_dict": state} if state is not None else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def load(path: str | Path, task: str | None = None, **kwargs: Any) -> nn.Module:
    """Load a compressed (or dense) model folder; the task comes from its config when omitted.

    Like ``AutoModelFor<Task>.from_pretrained(path)`` after ``import fwsvd``, but stricter (see
    :func:`fwsvd.models.load_model`): no code from the folder runs, pickle weights are refused
    unless ``allow_pickle=True``, the compression record is validated, and a missing or unused
    tensor is an error.

    Raises:
        ModelError: for a missing, unreadable, incomplete or inconsistent folder.
    """
    return load_model(path, task, **kwargs).model


def inspect(model: nn.Module) -> dict[str, Any]:
    """Parameter counts and ranks of a model, from its live modules and its compression record."""
    record = compression_record(model.config) or {}
    params = count_parameters(model)
    ranks = {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    return {
        "compressed": bool(record),
        "method": record.get("method"),
        "library_version": record.get("library_version"),
        "parameters": params,
        "dense_parameters": record.get("dense_parameters", params),
        "model_keep": params / record.get("dense_parameters", params),
        "target_keep": record.get("target_keep", 1.0),
        "keep": record.get("keep"),
        "target_parameters": record.get("target_parameters"),
        "target_dense_parameters": record.get("target_dense_parameters"),
        "ranks": ranks,
        "allocation": record.get("allocation", {"mode": "uniform"} if record else None),
        # What the folder was stored in (None: the model's own dtype; older folders may record only
        # their factors' dtype) and what this loaded model computes in.
        "stored_dtype": record.get("stored_dtype"),
        "factor_dtype": record.get("quantized_factors") or record.get("stored_dtype") or record.get("factor_dtype"),
        "quantized_factors": record.get("quantized_factors"),
        "dtype": dtype_name(next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)),
        "rank_table": rank_table(ranks, record.get("dense_layers", [])),
        "calibration": record.get("calibration", {}),
        "correction": record.get("correction"),
    }


def rank_table(ranks: Mapping[str, int], dense_layers: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Ranks by layer type and depth: ``model.layers.3.self_attn.q_proj`` is type ``self_attn.q_proj``
    at depth 3 (the first number in the name; names without one are their own type, depth ``None``).

    Returns:
        ``{layer type: {"depths": [...], "ranks": [rank or None (dense), ...]}}``, depths ascending.
    """
    table: dict[str, dict[int | None, int | None]] = {}
    entries = [(name, rank) for name, rank in ranks.items()] + [(name, None) for name in dense_layers]
    for name, rank in entries:
        parts = name.split(".")
        at = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        kind, depth = (name, None) if at is None else (".".join(parts[at + 1 :]) or name, int(parts[at]))
        table.setdefault(kind, {})[depth] = rank
    out: dict[str, dict[str, Any]] = {}
    for kind, by_depth in table.items():
        depths = sorted(by_depth, key=lambda d: (d is None, d if d is not None else 0))
        out[kind] = {"depths": depths, "ranks": [by_depth[d] for d in depths]}
    return out


def iter_config_fields(cls: type) -> Iterator[tuple[str, Any, str]]:
    """``(name, default, help)`` of a config dataclass, for the command line."""
    for f in fields(cls):
        yield f.name, f.default, f.metadata.get("help", "")
