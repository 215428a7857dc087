"""ONNX export of dense and fwsvd-compressed encoders, optional dynamic int8, and onnxruntime scoring.

An exported folder holds ``model.onnx``, the tokenizer files, ``config.json`` (labels and task,
without the compression record: nothing in it is rebuilt) and the marker :data:`MARKER_FILE`,
which says what the folder is (source, task, opset, int8, versions). A :class:`LowRankLinear`
exports as the two MatMuls it runs (``x B^T`` then ``· A^T + bias``); a quantized layer with its
correction exports de-quantised (``Q(W)`` dense plus the two correction MatMuls).

The exporter is torch's dynamo exporter (``torch.onnx.export(dynamo=True)``, onnxscript): it is
the one torch 2.13 supports, and it turns the Python branches of transformers' masking code into
guards on symbolic batch and sequence sizes, where the TorchScript tracer bakes the example's
values into the graph (it warns on ``padding_length > 0`` and ``q_length > 1`` for BERT). Each
export is checked against PyTorch on a second input shape before the folder is written.

onnx, onnxscript and onnxruntime are imported inside the functions that need them, so
``import fwsvd`` stays as light as before.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FwsvdError, ModelError
from ..nn import LowRankLinear, QuantizedLinear, swap_module
from ..storage.atomic import atomic_dir, check_writable_parent
from ..storage.loading import LoadedModel, check_no_custom_code, detect_task, first_line, load_model
from ..version import __version__

logger = logging.getLogger(__name__)

__all__ = [
    "EXPORT_TASKS",
    "FLOAT_TOLERANCE",
    "MARKER_FILE",
    "MODEL_FILE",
    "OnnxRuntimeModel",
    "export_onnx",
    "is_export_folder",
    "load_onnx",
    "matmul_counts",
    "read_marker",
    "session",
]

MARKER_FILE = "fwsvd-export.json"
MODEL_FILE = "model.onnx"
#: Tasks exported: encoders whose one output is ``logits`` (what ``fwsvd eval`` scores for them).
EXPORT_TASKS = ("sequence-classification", "token-classification")
#: Largest |ONNX Runtime float32 - PyTorch| logit the export check accepts.
FLOAT_TOLERANCE = 1e-4
DEFAULT_OPSET = 18
_FORMAT = "fwsvd-onnx"
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# A protobuf file cannot exceed 2 GiB; larger models would need ONNX's external-data layout.
_MAX_BYTES = 2**31 - 2**26


class _DequantizedLinear(nn.Module):
    """A :class:`QuantizedLinear` for export: ``x Q(W)^T + bias`` plus its correction ``x B^T A^T``."""

    def __init__(self, layer: QuantizedLinear) -> None:
        super().__init__()
        self.weight = nn.Parameter(layer.quantized_weight().detach().float().clone(), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone(), requires_grad=False)
        self.rank = layer.rank
        self.weight_in = nn.Parameter(layer.weight_in.detach().float().clone(), requires_grad=False) if layer.rank else None
        self.weight_out = nn.Parameter(layer.weight_out.detach().float().clone(), requires_grad=False) if layer.rank else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.weight_in is not None:
            y = y + F.linear(F.linear(x, self.weight_in), self.weight_out)
        return y


def _prepare(model: nn.Module) -> dict[str, int]:
    """Make ``model`` exportable in place: quantized layers de-quantised; count its layer kinds."""
    model.eval()  # load_model computes in float32 (a --dtype bfloat16 folder too)
    if hasattr(model, "set_attn_implementation"):
        # The same function in fewer nodes: SDPA exports with an IsNaN/Where guard over every
        # attention-probability tensor (and more reshapes), the eager attention as matmul, add
        # mask, softmax, matmul. In an interleaved probe on MiniLM-L6 (int8, 32 x 128, a loaded
        # machine) the eager form ran faster, dense and compressed alike.
        model.set_attn_implementation("eager")
    quantized = [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name in quantized:
        swap_module(model, name, _DequantizedLinear(model.get_submodule(name)))
    low_rank = 0
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            # A stacked first-factor group caches by tensor identity: export the plain two products.
            module.__dict__.pop("_shared_input", None)
            low_rank += 1
    return {"low_rank_layers": low_rank, "quantized_layers": len(quantized)}


def _example_inputs(tokenizer: Any, names: set[str], batch: int, length: int) -> dict[str, torch.Tensor]:
    """Token ids of ``batch`` rows of ``length`` tokens, the last row half padding (so masks matter)."""
    vocab = int(getattr(tokenizer, "vocab_size", 0) or len(tokenizer))
    generator = torch.Generator().manual_seed(batch * 1000 + length)
    ids = torch.randint(min(5, vocab - 1), vocab, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, length // 2 :] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {k: v for k, v in inputs.items() if k in names}


def _model_inputs(model: nn.Module, tokenizer: Any) -> set[str]:
    """The inputs among :data:`_INPUTS` that both the tokenizer produces and the model's forward takes."""
    import inspect

    produced = set(tokenizer("a b", "c d").keys()) | {"input_ids", "attention_mask"}
    accepted = set(inspect.signature(model.forward).parameters)
    return {name for name in _INPUTS if name in produced and name in accepted}


def _torch_export(model: nn.Module, inputs: dict[str, torch.Tensor], path: Path, opset: int) -> None:
    """Write ``model`` as ONNX with symbolic batch and sequence sizes (dynamo exporter, weights inside the file)."""
    from torch.export import Dim

    dims = {name: {0: Dim.DYNAMIC, 1: Dim.DYNAMIC} for name in inputs}
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(
            model, (), kwargs=inputs, dynamic_shapes=dims, input_names=list(inputs), output_names=["logits"],
            opset_version=opset, dynamo=True, external_data=False, optimize=True, verbose=False,
        )
    program.save(str(path), external_data=False)


def _quantize(source: Path, target: Path) -> None:
    """onnxruntime's dynamic int8 quantization of every MatMul with a weight initializer (dense and low-rank alike).

    Weights signed int8 with one scale per output channel, activations quantized at run time
    (uint8, ORT's u8 x s8 kernels): on MiniLM SST-2 this was as fast as per-tensor scales and
    closer to float32, and unsigned weights were slower (docs/deploy.md).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(source, target, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's and quantizer's logging (a line per tensor, on the root logger) and stdout chatter."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with contextlib.redirect_stdout(io.StringIO()) as chatter:
            yield
    finally:
        root.setLevel(level)
        logger.debug("%s", chatter.getvalue())


def session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of ``path``; ``threads`` sets intra-op threads (inter-op 1)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _run(sess: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    wanted = {i.name for i in sess.get_inputs()}
    missing = wanted - set(inputs)
    if missing:
        raise ModelError(f"the ONNX model needs input(s) {', '.join(sorted(missing))} that the tokenizer did not produce: re-export the model")
    feed = {k: v.detach().cpu().to(torch.int64).numpy() for k, v in inputs.items() if k in wanted}
    return torch.from_numpy(sess.run(["logits"], feed)[0])


def matmul_counts(path: str | os.PathLike) -> dict[str, int]:
    """How many nodes of each matrix-product type (``MatMul``, ``Gemm``, int8 ``DynamicQuantizeMatMul``…) a model file has."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if "MatMul" in node.op_type or node.op_type == "Gemm":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _check_against_torch(model: nn.Module, path: Path, tokenizer: Any, names: set[str], int8: bool) -> dict[str, float]:
    """Compare ONNX Runtime with PyTorch on a shape other than the export's; float32 must agree within :data:`FLOAT_TOLERANCE`."""
    inputs = _example_inputs(tokenizer, names, 3, 11)
    with torch.no_grad():
        expected = model(**inputs).logits.float()
    got = _run(session(path), inputs)
    if got.shape != expected.shape:
        raise FwsvdError(f"the ONNX model returned logits of shape {tuple(got.shape)} for {tuple(expected.shape)}: the export is broken; please report it")
    diff = float((got - expected).abs().max())
    agree = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
    if not int8 and not diff <= FLOAT_TOLERANCE:
        raise FwsvdError(f"the float32 ONNX model differs from PyTorch by {diff:.2e} (> {FLOAT_TOLERANCE:g}): the export is broken; please report it")
    return {"max_abs_diff": diff, "argmax_agreement": agree}


def _marker(loaded: LoadedModel, layers: dict[str, int], names: set[str], opset: int, int8: bool) -> dict[str, Any]:
    import onnx
    import onnxruntime

    record = getattr(getattr(loaded.model.config, "quantization_config", None), "to_dict", lambda: None)()
    compressed = None if not record else {k: record.get(k) for k in ("method", "keep", "allocation") if k in record}
    return {
        "format": _FORMAT, "format_version": 1, "source": loaded.source, "task": loaded.task, "model_file": MODEL_FILE,
        "inputs": sorted(names), "outputs": ["logits"], "opset": opset, "int8": int8,
        "quantization": {"method": "onnxruntime.quantize_dynamic", "weights": "QInt8", "per_channel": True, "op_types": ["MatMul"]} if int8 else None,
        "compressed": compressed, **layers,
        "versions": {"fwsvd": __version__, "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }


def _check_output(model: str | os.PathLike, out: str | os.PathLike, overwrite: bool) -> Path:
    """``--onnx`` may be written: not the input folder or inside it, not holding it, not an existing folder unless ``overwrite``."""
    path = Path(out).expanduser()
    resolved, source, cwd = path.resolve(), Path(model).expanduser().resolve(), Path.cwd().resolve()
    if resolved in (source, cwd) or source in resolved.parents or resolved in source.parents or resolved in cwd.parents:
        raise FwsvdError(f"--onnx {out} is, holds or lies inside the model folder {model} or the current folder: choose a new folder")
    if path.exists() and not path.is_dir():
        raise FwsvdError(f"--onnx {out} is a file: name a folder to write")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FwsvdError(f"--onnx {out} exists and is not empty: pass --overwrite to replace it, or choose another folder")
    check_writable_parent(path, "--onnx")
    return path


def export_onnx(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    int8: bool = False,
    task: str | None = None,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Export a dense or fwsvd-compressed model folder to an ONNX Runtime folder (written atomically).

    Args:
        model: the model folder (or hub id), loaded with :func:`fwsvd.storage.loading.load_model`'s checks.
        out: the folder to write: ``model.onnx``, tokenizer files, ``config.json`` and :data:`MARKER_FILE`.
        int8: quantize every weight MatMul (dense and both factors of low-rank layers) with
            onnxruntime's dynamic int8 quantization.
        task: one of :data:`EXPORT_TASKS`; detected when ``None``.
        opset: ONNX opset of the graph.
        overwrite: replace an existing non-empty ``out``.
        allow_pickle: accept pickle weights (see ``load_model``).

    Returns:
        ``out``, ``task``, ``int8``, the layer counts, ``matmuls`` (node types), ``bytes`` of
        ``model.onnx``, the check against PyTorch (``max_abs_diff``, ``argmax_agreement``) and ``seconds``.

    Raises:
        FwsvdError: for an export folder given as the model, a task that does not export, an output
            that may not be written, or a failed float32 check.
    """
    start = time.perf_counter()
    if is_export_folder(model):
        raise ModelError(f"{model} is already an ONNX export (it holds {MARKER_FILE}): export the model folder it came from")
    if not 7 <= opset <= 23:
        raise FwsvdError(f"--opset {opset} is outside the opsets supported here (7..23): use {DEFAULT_OPSET}")
    path = _check_output(model, out, overwrite)
    loaded = load_model(model, task, need_tokenizer=True, allow_pickle=allow_pickle)
    if loaded.task not in EXPORT_TASKS:
        raise ModelError(f"{model} is a {loaded.task} model: ONNX export covers {' and '.join(EXPORT_TASKS)} models for now")
    layers = _prepare(loaded.model)
    size = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    if size > _MAX_BYTES:
        raise ModelError(f"{model} holds {size / 2**30:.1f} GiB of float32 weights: one ONNX file holds under 2 GiB; compress it further or export a smaller model")
    names = _model_inputs(loaded.model, loaded.tokenizer)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        float_path = tmp / (f"float.{MODEL_FILE}" if int8 else MODEL_FILE)
        _torch_export(loaded.model, _example_inputs(loaded.tokenizer, names, 2, 16), float_path, opset)
        if int8:
            _quantize(float_path, tmp / MODEL_FILE)
            float_path.unlink()
        check = _check_against_torch(loaded.model, tmp / MODEL_FILE, loaded.tokenizer, names, int8)
        loaded.tokenizer.save_pretrained(tmp)
        config = loaded.model.config.to_dict()
        config.pop("quantization_config", None)  # the record rebuilds PyTorch layers; nothing here rebuilds any
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        marker = _marker(loaded, layers, names, opset, int8)
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        matmuls, size = matmul_counts(tmp / MODEL_FILE), (tmp / MODEL_FILE).stat().st_size
    logger.info("wrote %s (%s, %.1f MB)", path, "int8" if int8 else "float32", size / 1e6)
    return {"out": str(path), "source": loaded.source, "task": loaded.task, "int8": int8, "opset": opset, **layers,
            "matmuls": matmuls, "bytes": size, **check, "seconds": round(time.perf_counter() - start, 3)}


def is_export_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`export_onnx` (it holds :data:`MARKER_FILE`)."""
    return Path(path).expanduser().is_dir() and (Path(path).expanduser() / MARKER_FILE).is_file()


def read_marker(folder: str | os.PathLike) -> dict[str, Any]:
    """The marker of an exported folder, read as untrusted JSON and checked field by field.

    Raises:
        ModelError: naming the file and the field at fault.
    """
    path = Path(folder).expanduser() / MARKER_FILE
    fix = f"re-export the model with fwsvd export MODEL --onnx {folder} --overwrite"
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read {path} ({first_line(err)}): {fix}") from err
    checks = {
        "format": lambda v: v == _FORMAT,
        "format_version": lambda v: v == 1,
        "task": lambda v: v in EXPORT_TASKS,
        "model_file": lambda v: v == MODEL_FILE,
        "inputs": lambda v: isinstance(v, list) and "input_ids" in v and set(v) <= set(_INPUTS),
        "opset": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "int8": lambda v: isinstance(v, bool),
    }
    if not isinstance(marker, dict):
        raise ModelError(f"{path} is not a JSON object: {fix}")
    for key, valid in checks.items():
        if key not in marker or not valid(marker[key]):
            raise ModelError(f"{path}: field {key!r} is missing or invalid ({marker.get(key)!r}): {fix}")
    if not (Path(folder).expanduser() / MODEL_FILE).is_file():
        raise ModelError(f"{folder} has {MARKER_FILE} but no {MODEL_FILE}: {fix}")
    return marker


class OnnxRuntimeModel(nn.Module):
    """An exported model behind PyTorch's calling convention: ``model(**batch).logits``, for ``fwsvd eval``.

    Holds no parameters; ``config`` is the exported folder's transformers config (labels, task).
    """

    def __init__(self, sess: Any, config: Any) -> None:
        super().__init__()
        self.session = sess
        self.config = config

    def forward(self, **inputs: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=_run(self.session, inputs))


def load_onnx(folder: str | os.PathLike, task: str | None = None, *, threads: int | None = None) -> LoadedModel:
    """Load an exported folder for scoring: an onnxruntime session wrapped as :class:`OnnxRuntimeModel`, with its tokenizer.

    Raises:
        ModelError: for a folder whose marker, config or tokenizer is missing or invalid, or a
            ``task`` other than the exported one.
    """
    from transformers import AutoConfig, AutoTokenizer

    marker = read_marker(folder)
    if task is not None and task != marker["task"]:
        raise ModelError(f"{folder} was exported as a {marker['task']} model, not {task}: drop --task or pass --task {marker['task']}")
    check_no_custom_code(folder)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot load the config or tokenizer of {folder} ({first_line(err)}): re-export the model") from err
    if detect_task(config) != marker["task"]:
        raise ModelError(f"{folder}: config.json's architecture is not a {marker['task']} model as {MARKER_FILE} says: re-export the model")
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    errors = (state.Fail, state.InvalidArgument, state.InvalidGraph, state.InvalidProtobuf, state.NoSuchFile, state.NotImplemented)
    try:
        sess = session(Path(folder).expanduser() / MODEL_FILE, threads)
    except errors as err:
        raise ModelError(f"onnxruntime cannot load {folder}/{MODEL_FILE} ({first_line(err)}): re-export the model") from err
    return LoadedModel(OnnxRuntimeModel(sess, config), tokenizer, marker["task"], str(folder))
