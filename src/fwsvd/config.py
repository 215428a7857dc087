"""What a user sets: the compression and calibration configs (every field's help text is reused by the command line)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any


from .core import DENSE_CHOICES
from .device import COMPUTE_DTYPES, DEVICE_HELP, resolve_device
from .errors import FwsvdError
from .methods import METHODS, Method, get_method

#: ``--dense-choice``: a rule of :func:`fwsvd.core.allocate_ranks`, or ``auto`` (both, the better on held-out text).
DENSE_CHOICE_OPTIONS = (*DENSE_CHOICES, "auto")


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
        "dense product (benchmarks/layer_kernels.py measures where on a CPU); 1 keeps dense only layers that would save nothing",
        default=1.0,
    )
    dense_choice: str | None = help_field(
        "global allocation: when a layer may stay dense: 'break-even' (only once its rank would pass break-even) or 'loss' "
        "(at any rank, when the estimated loss of its discarded components is worth the parameters staying dense costs, "
        "priced like every other component), or 'auto' (a causal LM compressed in one process with calibration text: both "
        "rules applied to the same decompositions and the one whose model has the lower loss on held-out blocks of the text kept); "
        "default: auto where compress is given held-out text (the command line: a causal LM compressed in one pass with --data), "
        "else break-even",
        default=None,
    )
    rank_multiple: int = help_field(
        "round every rank to a multiple of this (matrix kernels run fastest on widths that fill their vector registers and "
        "blocks; benchmarks/layer_kernels.py measures which) without holding more parameters in total than unrounded ranks; "
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
        if self.dense_choice is not None and self.dense_choice not in DENSE_CHOICE_OPTIONS:
            raise FwsvdError(f"--dense-choice {self.dense_choice!r} must be one of {', '.join(DENSE_CHOICE_OPTIONS)}")
        if self.dense_choice not in (None, "break-even") and self.resolved_allocation() != "global":
            raise FwsvdError(
                f"--dense-choice {self.dense_choice} applies to global allocation, but {self.method} allocates "
                f"{self.resolved_allocation()}: pass --allocation global, or drop --dense-choice"
            )
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


#: A causal LM's default ``cov_samples`` (in one pass): this many times ``samples``. On SmolLM2-135M the
#: input covariance of 16 blocks gains more from 64 or 128 blocks than the Fisher does (docs/decoders.md).
COV_FACTOR = 8


@dataclass
class CalibrationConfig:
    """Which calibration data to use and how to batch it."""

    data: str | None = help_field("calibration data: .tsv/.csv/.jsonl with labels, .txt for causal LMs, or a datasets hub name", default=None)
    samples: int | None = help_field("calibration rows (classification, default 512) or token blocks (causal LM, default 32)", default=None)
    cov_samples: int | None = help_field(
        "rows or blocks the input covariance (whitening) is taken over, when more than --samples: the extra ones, drawn with "
        "the same --seed, run forward only (no backward pass: a fraction of the Fisher's cost), while Fisher stays on --samples "
        f"(default: {COV_FACTOR} x --samples for a causal LM calibrated in one pass, else --samples)",
        default=None,
    )
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
    device: str = help_field(
        DEVICE_HELP + "; the model is moved there for calibration and stays there, so that factorization runs there too "
        "(with --low-memory one block at a time goes there)",
        default="auto",
    )

    compute_dtype: str = help_field(
        f"dtype the model runs in during calibration: {', '.join(COMPUTE_DTYPES)}; bfloat16/float16 halve a GPU's memory "
        "and time for the forward and backward passes while the statistics still accumulate in float32/float64 and the "
        "factorization uses the float32 weights (docs/gpu.md measures the cost)",
        default="float32",
    )
    fisher_labels: str = help_field(
        "where Fisher's labels come from: 'data' (the empirical Fisher: the calibration data's labels) or 'model' (the true Fisher: "
        "the expectation over the model's own predictions, one backward pass per class; classifiers and regressors only)",
        default="data",
    )

    def __post_init__(self) -> None:
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise FwsvdError(f"--calibration-dtype {self.compute_dtype!r} must be one of {', '.join(COMPUTE_DTYPES)}")
        for name in ("samples", "cov_samples", "batch_size", "max_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise FwsvdError(f"--{name.replace('_', '-')} {value!r} must be a positive integer")
        self.device = str(self.device) if self.device is not None else "auto"
        resolve_device(self.device)  # a GPU asked for where there is none fails here, before any work
        if self.fisher_labels not in ("data", "model"):
            raise FwsvdError(f"--fisher-labels {self.fisher_labels!r} must be 'data' or 'model'")
        if self.cov_samples is not None and self.low_memory and (self.samples is None or self.cov_samples > self.samples):
            raise FwsvdError("--cov-samples adds a forward-only pass over the whole model: drop --low-memory, or drop --cov-samples")
        if self.fisher_labels == "model" and self.low_memory:
            raise FwsvdError("--fisher-labels model needs the whole model's outputs in one pass: drop --low-memory, or use --fisher-labels data")

    def resolved(self, task: str) -> CalibrationConfig:
        causal = task == "causal-lm"
        samples = self.samples or (32 if causal else 512)
        if self.cov_samples is not None and self.cov_samples < samples:
            raise FwsvdError(
                f"--cov-samples {self.cov_samples} is below the {samples} calibration samples the covariance already takes: "
                f"pass at least {samples}, or drop --cov-samples"
            )
        cov_samples = self.cov_samples
        if cov_samples is None and causal and not self.low_memory:
            # The whitening's covariance is short of data long before the Fisher is (docs/decoders.md) and costs
            # forward passes only: a causal LM's default takes it over COV_FACTOR times the Fisher's blocks.
            cov_samples = COV_FACTOR * samples
        return CalibrationConfig(
            data=self.data,
            samples=samples,
            cov_samples=cov_samples,
            # With low_memory, blocks run one example at a time unless asked otherwise: a block's
            # working set grows with the batch, and there is no whole-model pass to amortize.
            batch_size=self.batch_size or (1 if self.low_memory else 4 if causal else 16),
            max_length=self.max_length or (512 if causal else 128),
            seed=self.seed,
            text_column=self.text_column,
            pair_column=self.pair_column,
            label_column=self.label_column,
            low_memory=self.low_memory,
            device=self.device,
            compute_dtype=self.compute_dtype,
            fisher_labels=self.fisher_labels,
        )


def iter_config_fields(cls: type) -> Iterator[tuple[str, Any, str]]:
    """``(name, default, help)`` of a config dataclass, for the command line."""
    for f in fields(cls):
        yield f.name, f.default, f.metadata.get("help", "")


#: The weight grids of ``--quantize`` (see :mod:`fwsvd.quantization`).
QUANTIZE_SCHEMES = ("int8", "int4", "int3")
#: Without ``--correction-rank`` or ``--budget-bytes``, the low-rank correction may add this share of
#: the quantized layers' bytes (the issue's target: a correction of at most a tenth of the int4 bytes).
DEFAULT_CORRECTION_SHARE = 0.1
#: Inputs per scale by scheme when ``--group-size`` is not given (int8: one scale per output row).
DEFAULT_GROUP_SIZE = {"int8": None, "int4": 32, "int3": 32}


@dataclass
class QuantizeConfig:
    """How ``--quantize`` stores the targeted layers: a weight grid plus a low-rank correction of its error."""

    scheme: str = help_field(f"weight grid of every targeted linear: {', '.join(QUANTIZE_SCHEMES)} (round to nearest, symmetric)", default="int4")
    group_size: int | None = help_field(
        "inputs per float16 scale (default 32 for int4/int3, one scale per output row for int8); the last group of a row may be shorter",
        default=None,
    )
    correction_rank: int | None = help_field("the same correction rank in every layer (0: none) instead of a byte budget", default=None)
    budget_bytes: float | None = help_field(
        "the whole model's weight bytes as a fraction of the dense model's (float32 safetensors payload); what the "
        "quantized layers and the untouched tensors leave goes to the correction, ranked across layers by the method's loss estimate",
        default=None,
    )
    correction_share: float = help_field(
        "without --correction-rank/--budget-bytes: the correction's bytes as a fraction of the quantized layers' bytes", default=DEFAULT_CORRECTION_SHARE,
    )

    def __post_init__(self) -> None:
        if self.scheme not in QUANTIZE_SCHEMES:
            raise FwsvdError(f"--quantize {self.scheme!r} must be one of {', '.join(QUANTIZE_SCHEMES)}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1):
            raise FwsvdError(f"--group-size {self.group_size!r} must be a whole number of inputs >= 1, e.g. 32, 64 or 128")
        if self.correction_rank is not None and self.budget_bytes is not None:
            raise FwsvdError("--correction-rank and --budget-bytes both size the correction: pass one of them")
        if self.correction_rank is not None and (isinstance(self.correction_rank, bool) or not isinstance(self.correction_rank, int) or self.correction_rank < 0):
            raise FwsvdError(f"--correction-rank {self.correction_rank!r} must be a whole number >= 0 (0: no correction)")
        if self.budget_bytes is not None and not (isinstance(self.budget_bytes, (int, float)) and not isinstance(self.budget_bytes, bool)
                                                  and math.isfinite(self.budget_bytes) and 0 < self.budget_bytes <= 1):
            raise FwsvdError(f"--budget-bytes {self.budget_bytes!r} must be a fraction in (0, 1] of the dense model's bytes")
        if not (isinstance(self.correction_share, (int, float)) and math.isfinite(self.correction_share) and 0 <= self.correction_share <= 10):
            raise FwsvdError(f"correction share {self.correction_share!r} must be a number in [0, 10]")

    @property
    def bits(self) -> int:
        from .quantization import scheme_bits

        return scheme_bits(self.scheme)

    @property
    def group(self) -> int | None:
        """Inputs per scale: ``--group-size``, else the scheme's default (``None``: one scale per output row)."""
        return self.group_size if self.group_size is not None else DEFAULT_GROUP_SIZE[self.scheme]

    def resolved_group_size(self, in_features: int) -> int:
        """Inputs per scale for a layer of ``in_features`` inputs."""
        return in_features if self.group is None else self.group
