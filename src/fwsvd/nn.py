"""One generic low-rank layer and the functions that find and swap linear layers in a model."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

# GPT-2 family keeps its projections in a transposed ``Conv1D`` layout ([in, out]).
from transformers.pytorch_utils import Conv1D

from .errors import ModelError

__all__ = [
    "check_finite_weights",
    "LinearInfo",
    "LowRankLinear",
    "QuantizedLinear",
    "SharedInput",
    "find_blocks",
    "find_targets",
    "get_submodule_parent",
    "linear_bias",
    "linear_weight",
    "low_rank_skeleton",
    "quantized_skeleton",
    "stack_shared_inputs",
    "swap_module",
]

LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D)
#: The parameter names of a :class:`LowRankLinear`'s two factors (``weight_in`` is applied first).
FACTORS = ("weight_in", "weight_out")


class LowRankLinear(nn.Module):
    """``y = x B^T A^T + bias``: a linear layer stored as two thin factors.

    ``weight_in`` (``B``, ``[rank, in_features]``) is applied first, then ``weight_out``
    (``A``, ``[out_features, rank]``) and the dense layer's bias, so ``A @ B`` plays the part of the
    dense ``weight``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} is outside [1, {min(in_features, out_features)}]")
        kw = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.weight_in = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.weight_out = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        if self.weight_in.device.type != "meta":
            nn.init.kaiming_uniform_(self.weight_in, a=5**0.5)
            nn.init.kaiming_uniform_(self.weight_out, a=5**0.5)

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> LowRankLinear:
        """Build from ``A: [out, rank]``, ``B: [rank, in]`` and an optional bias, keeping device and dtype."""
        layer = cls(b.shape[1], a.shape[0], a.shape[1], bias=bias is not None, device=a.device, dtype=a.dtype)
        with torch.no_grad():
            layer.weight_out.copy_(a)
            layer.weight_in.copy_(b)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group: SharedInput | None = self.__dict__.get("_shared_input")
        if group is not None and x.dtype == self.weight_in.dtype:
            h = group.project(self, x)
            if h is not None:
                return F.linear(h, self.weight_out, self.bias)
        if x.dtype != self.weight_in.dtype:
            # Factors in another dtype than the activations (cast alone by ``fwsvd.api.cast_factors``).
            return F.linear(F.linear(x.to(self.weight_in.dtype), self.weight_in), self.weight_out, self.bias).to(x.dtype)
        return F.linear(F.linear(x, self.weight_in), self.weight_out, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The ``[out, in]`` product ``A @ B`` (for checks and export, not for inference)."""
        return self.weight_out @ self.weight_in

    @property
    def weight(self) -> torch.Tensor:
        """The dense product :meth:`dense_weight`, computed on each access; writing into it changes nothing.

        Exists for code written against ``nn.Linear``: transformers' weight-initialisation routines
        run on every load and touch ``child.weight`` of attention and MLP modules (GPT-2's scaled
        ``c_proj`` initialisation), which would otherwise fail on a reloaded compressed model.
        """
        return self.dense_weight()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


class QuantizedLinear(nn.Module):
    """``y = x (Q(W) + A B)^T + bias``: a quantized weight plus a low-rank correction of its error.

    The weight is kept as its integer grid, packed (:func:`fwsvd.quantization.pack`: int8, two int4
    or eight int3 values in three bytes) in the ``qweight`` buffer, with float16 ``scales`` per group
    of ``group_size`` inputs; ``weight_in`` (``B``, ``[rank, in]``) and ``weight_out`` (``A``,
    ``[out, rank]``) fit the rounding error ``W - Q(W)`` where the method's weighting says it
    matters (rank 0: no correction). The de-quantised weight is computed once and cached (not saved).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bits: int,
        group_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        from .quantization import packed_bytes

        if not 0 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} is outside [0, {min(in_features, out_features)}]")
        if group_size < 1:
            raise ValueError(f"group size {group_size} must be at least 1")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank, self.bits, self.group_size = in_features, out_features, rank, bits, group_size
        groups = -(-in_features // group_size)
        self.register_buffer("qweight", torch.zeros(packed_bytes(out_features * in_features, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16, device=device))
        self.weight_in = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.weight_out = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self._cache: tuple[tuple[int, int, int, int], torch.Tensor] | None = None

    @classmethod
    def from_weight(
        cls, q: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
        a: torch.Tensor | None, b: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32,
    ) -> QuantizedLinear:
        """Build from integer values ``q`` ``[out, in]``, their ``scales``, correction factors (or ``None``) and a bias."""
        from .quantization import pack

        out_f, in_f = q.shape
        rank = 0 if a is None else a.shape[1]
        layer = cls(in_f, out_f, rank, bits, group_size, bias=bias is not None, device=q.device, dtype=dtype)
        with torch.no_grad():
            layer.qweight.copy_(pack(q, bits))
            layer.scales.copy_(scales)
            if rank:
                layer.weight_out.copy_(a)
                layer.weight_in.copy_(b)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def quantized_weight(self) -> torch.Tensor:
        """The de-quantised ``Q(W)`` ``[out, in]`` in the layer's dtype (cached until a buffer changes)."""
        from .quantization import dequantize, unpack

        key = (self.qweight.data_ptr(), self.qweight._version, self.scales.data_ptr(), self.scales._version)
        dtype = self.weight_in.dtype
        if self._cache is None or self._cache[0] != key or self._cache[1].dtype != dtype or self._cache[1].device != self.qweight.device:
            q = unpack(self.qweight, self.bits, (self.out_features, self.in_features))
            self._cache = (key, dequantize(q, self.scales, self.group_size, dtype))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.quantized_weight().to(x.dtype), self.bias)
        if self.rank:
            y = y + F.linear(F.linear(x, self.weight_in.to(x.dtype)), self.weight_out.to(x.dtype))
        return y

    def dense_weight(self) -> torch.Tensor:
        """``Q(W) + A B`` (for checks and export, not for inference)."""
        return self.quantized_weight() + self.weight_out @ self.weight_in

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent :meth:`dense_weight`, for code written against ``nn.Linear`` (see :class:`LowRankLinear`)."""
        return self.dense_weight()

    def storage_bytes(self) -> dict[str, int]:
        """Bytes this layer stores: the packed grid, the scales, the correction factors (float16), the bias."""
        return {
            "weight": self.qweight.numel(),
            "scales": self.scales.numel() * 2,
            "correction": (self.weight_in.numel() + self.weight_out.numel()) * 2,
            "bias": 0 if self.bias is None else self.bias.numel() * self.bias.element_size(),
        }

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, rank={self.rank}, bias={self.bias is not None}")


class SharedInput:
    """Low-rank layers that read the same input tensor, their first factors run as ONE product.

    q/k/v projections (and gate/up) each multiply the same activations by their thin ``B``; one
    product with the stacked ``[B_q; B_k; B_v]`` reads the activations once and makes one call
    instead of three. The first member to see an input computes the stacked product; a member
    that receives the identical tensor object (same ``id``, unmodified) takes its slice of it.
    Anything else (another input, gradients wanted, factors changed) takes the plain path, so
    the result is always that of :meth:`LowRankLinear.forward`.

    Holds no parameters: the state dict, saving and loading are unchanged. Attach with
    :func:`stack_shared_inputs`.
    """

    def __init__(self, members: Sequence[LowRankLinear]) -> None:
        self.members = list(members)
        self._weights_key: tuple[tuple[int, int], ...] | None = None
        self._stacked: torch.Tensor | None = None
        self._offsets: dict[int, tuple[int, int]] = {}
        self._input: torch.Tensor | None = None
        self._input_version = -1
        self._output: torch.Tensor | None = None

    def _stacked_weight(self) -> torch.Tensor:
        key = tuple((m.weight_in.data_ptr(), m.weight_in._version) for m in self.members)
        if key != self._weights_key:
            self._stacked = torch.cat([m.weight_in.detach() for m in self.members])
            starts = [0]
            for m in self.members:
                starts.append(starts[-1] + m.rank)
            self._offsets = {id(m): (a, b) for m, a, b in zip(self.members, starts, starts[1:])}
            self._weights_key = key
        assert self._stacked is not None
        return self._stacked

    def project(self, member: LowRankLinear, x: torch.Tensor) -> torch.Tensor | None:
        """``x @ member.weight_in.T`` from the shared product, or ``None`` for the plain path."""
        if torch.is_grad_enabled() and (x.requires_grad or member.weight_in.requires_grad):
            return None  # training: autograd needs each factor's own product
        # Inference tensors keep no version counter (and cannot change outside inference mode).
        version = -2 if x.is_inference() else x._version
        if x is not self._input or version != self._input_version:
            if member is not self.members[0]:
                return None  # not the group's input (or the group was entered elsewhere)
            stacked = self._stacked_weight()
            self._output = F.linear(x, stacked)
            self._input, self._input_version = x, version
        elif self._weights_key != tuple((m.weight_in.data_ptr(), m.weight_in._version) for m in self.members):
            return None
        start, stop = self._offsets[id(member)]
        assert self._output is not None
        out = self._output[..., start:stop]
        if member is self.members[-1]:
            self._input = self._output = None  # the last member frees the cached activations
        return out

    def __repr__(self) -> str:
        return f"SharedInput({len(self.members)} layers, rank {sum(m.rank for m in self.members)})"


def stack_shared_inputs(model: nn.Module, *example_args: Any, **example_kwargs: Any) -> list[list[str]]:
    """Find the :class:`LowRankLinear` layers that read the same tensor and give each group a :class:`SharedInput`.

    The groups come from one forward pass on an example input (``model.dummy_inputs`` when none
    is given): layers whose input was the same tensor object share it, whatever the model family.
    Only layers called in a fixed order inside one parent module are grouped.

    Returns:
        The groups found, as lists of module names (each of two or more layers).
    """
    layers = {id(m): name for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            m.__dict__.pop("_shared_input", None)
    seen: dict[int, list[str]] = {}
    keep_alive: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            keep_alive.append(args[0])  # ids stay unique while the pass runs
            seen.setdefault(id(args[0]), []).append(layers[id(module)])

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, LowRankLinear)]
    try:
        if not example_args and not example_kwargs:
            example_kwargs = dict(getattr(model, "dummy_inputs", {}))
        with torch.no_grad():
            model(*example_args, **example_kwargs)
    finally:
        for h in handles:
            h.remove()
    groups = []
    for names in seen.values():
        parents = {n.rpartition(".")[0] for n in names}
        if len(names) >= 2 and len(set(names)) == len(names) and len(parents) == 1:
            group = SharedInput([model.get_submodule(n) for n in names])
            for m in group.members:
                m.__dict__["_shared_input"] = group
            groups.append(names)
    return groups


@dataclass(frozen=True)
class LinearInfo:
    """Shape facts of a targeted linear layer."""

    name: str
    out_features: int
    in_features: int
    bias: bool
    kind: str  # "linear" or "conv1d"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear-like module in ``[out, in]`` layout (a view, no copy)."""
    if isinstance(module, LowRankLinear):
        return module.dense_weight()
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, Conv1D):
        return module.weight.t()
    raise TypeError(f"{type(module).__name__} is not a supported linear layer")


def linear_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias of a linear-like module, or ``None``."""
    return getattr(module, "bias", None)


def _info(name: str, module: nn.Module) -> LinearInfo:
    w = linear_weight(module)
    kind = "linear" if isinstance(module, nn.Linear) else "conv1d"
    return LinearInfo(name, int(w.shape[0]), int(w.shape[1]), linear_bias(module) is not None, kind)


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the model's repeated transformer blocks.

    The blocks are found structurally, never by model-family name: the largest ``nn.ModuleList``
    whose children all share one class (``encoder.layer`` in BERT, ``model.layers`` in Llama,
    ``transformer.h`` in GPT-2, ``model.decoder.layers`` in OPT).
    """
    stacks: list[tuple[int, str]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(child) for child in module}) == 1:
            stacks.append((sum(p.numel() for p in module.parameters()), name))
    if not stacks:
        return []
    largest = max(size for size, _ in stacks)
    # Encoder-decoder models have two stacks of similar size; expert lists nested inside a block
    # belong to that block already.
    chosen: list[str] = []
    for size, name in stacks:
        if size >= largest / 4 and not any(name.startswith(f"{c}.") for c in chosen):
            chosen.append(name)
    return [f"{prefix}.{i}" for prefix in chosen for i in range(len(model.get_submodule(prefix)))]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """A pattern matches a module name as a glob (``*.attention.*``) or as a regular expression."""
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern):
            return True
        try:
            if re.fullmatch(pattern, name):
                return True
        except re.error:
            continue
    return False


def find_targets(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> list[LinearInfo]:
    """Leaf linear layers to factorize, in model order.

    By default every ``nn.Linear`` / ``Conv1D`` inside the transformer blocks (attention and
    feed-forward); embeddings, poolers, classifier heads and ``lm_head`` sit outside the blocks and
    are left alone. ``include`` patterns (globs or regexes on module names) replace the default
    selection with any matching linear layer; ``exclude`` patterns then remove matches.

    Raises:
        ModelError: when nothing is left to factorize.
    """
    include = list(include or [])
    exclude = list(exclude or [])
    blocks = find_blocks(model)
    block_prefixes = tuple(f"{b}." for b in blocks)
    found: list[LinearInfo] = []
    for name, module in model.named_modules():
        if not isinstance(module, LINEAR_TYPES):
            continue
        selected = _matches(name, include) if include else name.startswith(block_prefixes)
        if selected and not _matches(name, exclude):
            found.append(_info(name, module))
    if not found:
        hint = f" (include={include}, exclude={exclude})" if include or exclude else ""
        raise ModelError(
            f"{type(model).__name__} has no supported linear layers to factorize{hint}: "
            "fwsvd needs nn.Linear or GPT-2 Conv1D layers inside repeated transformer blocks, or --include patterns"
        )
    return found


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module of ``name`` and the attribute under which it holds the child."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule ``name`` with ``new`` in place and return the old one."""
    parent, child = get_submodule_parent(model, name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def low_rank_skeleton(model: nn.Module, ranks: dict[str, int]) -> None:
    """Swap each named linear layer for an uninitialised :class:`LowRankLinear` of the recorded rank.

    Keeps each layer's device and dtype (``meta`` during ``from_pretrained``). Used when loading a
    saved compressed model, before its weights are read.

    Raises:
        ModelError: when a recorded module is missing or is not a linear layer.
    """
    for name, rank in ranks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise ModelError(f"compressed module {name!r} is not in this model: the config does not match the weights") from err
        if isinstance(module, LowRankLinear):
            continue
        if not isinstance(module, LINEAR_TYPES):
            raise ModelError(f"compressed module {name!r} is a {type(module).__name__}, not a linear layer")
        info = _info(name, module)
        w = linear_weight(module)
        swap_module(model, name, LowRankLinear(info.in_features, info.out_features, int(rank), bias=info.bias, device=w.device, dtype=w.dtype))


def check_finite_weights(model: nn.Module, source: str | None = None) -> None:
    """Raise :class:`ModelError` naming the first weight of ``model`` that is not finite floating-point data.

    Every parameter must be floating point (transformers loads an integer or boolean tensor stored
    for a float weight as it is, and the first product fails), and no parameter or floating-point
    buffer may hold NaN or inf.

    Args:
        model: any module; tensors on the meta device (not loaded yet) are skipped.
        source: where the model came from, for the message.

    Raises:
        ModelError: naming the tensor and what is wrong with it.
    """
    where = f" of {source}" if source else ""
    for name, param in model.named_parameters():
        if not param.is_floating_point() and param.device.type != "meta":
            raise ModelError(f"weight {name}{where} is stored as {param.dtype}, not floating point: the weights are damaged; restore or re-export them")
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            raise ModelError(
                f"tensor {name}{where} holds {bad} NaN or infinite value(s) of {tensor.numel()}: the model is corrupt; "
                "restore or re-export its weights"
            )


def count_parameters(model: nn.Module) -> int:
    """Parameters of a model, each shared (tied) tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def quantized_skeleton(model: nn.Module, ranks: dict[str, int], bits: int, group_size: int | None) -> None:
    """Swap each named linear layer for an empty :class:`QuantizedLinear` of the recorded grid and correction rank.

    ``group_size`` ``None`` means one scale per output row. Keeps each layer's device and dtype
    (``meta`` during ``from_pretrained``); used before a saved quantized model's weights are read.

    Raises:
        ModelError: when a recorded module is missing, not a linear layer, or its rank does not fit.
    """
    for name, rank in ranks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise ModelError(f"quantized module {name!r} is not in this model: the config does not match the weights") from err
        if isinstance(module, QuantizedLinear):
            continue
        if not isinstance(module, LINEAR_TYPES):
            raise ModelError(f"quantized module {name!r} is a {type(module).__name__}, not a linear layer")
        info = _info(name, module)
        if rank > min(info.in_features, info.out_features):
            raise ModelError(f"the correction rank of {name} is {rank}, above min({info.out_features}, {info.in_features}): the config does not match the weights")
        w = linear_weight(module)
        group = info.in_features if group_size is None else group_size
        swap_module(model, name, QuantizedLinear(info.in_features, info.out_features, int(rank), bits, group, bias=info.bias, device=w.device, dtype=w.dtype))
