"""Loading models and tokenizers from local folders, GGUF files or the hub, and naming their task."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ..nn import FACTORS, check_finite_weights

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedModel",
    "PICKLE_SUFFIXES",
    "TASKS",
    "auto_model_class",
    "check_no_custom_code",
    "check_record",
    "detect_task",
    "dtype_name",
    "first_line",
    "load_config",
    "load_model",
    "load_weights",
    "model_source",
    "own_storage",
    "safetensors_files",
    "weight_headers",
    "weight_shapes",
]

#: Tasks fwsvd calibrates and evaluates, with the transformers auto class of each.
TASKS = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "causal-lm": "AutoModelForCausalLM",
}


@dataclass
class LoadedModel:
    """A model with its tokenizer (``None`` when the folder has none) and task."""

    model: nn.Module
    tokenizer: Any
    task: str
    source: str


def _mapping_names(task: str) -> set[str]:
    from transformers.models.auto import modeling_auto as ma

    table = {
        "sequence-classification": ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "token-classification": ma.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
        "causal-lm": ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    }[task]
    names: set[str] = set()
    for value in table.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return names


def detect_task(config: Any) -> str:
    """The task of a model config, from its ``architectures`` and transformers' auto-class tables.

    Raises:
        ModelError: when the architecture is missing or is none of :data:`TASKS`.
    """
    archs = getattr(config, "architectures", None) or []
    if not isinstance(archs, (list, tuple)) or not all(isinstance(a, str) for a in archs):
        raise ModelError(f"architectures in config.json is {archs!r}, not a list of class names: restore the model's config.json")
    for arch in archs:
        for task in TASKS:
            if arch in _mapping_names(task):
                return task
    raise ModelError(
        f"cannot tell the task of architecture {archs or 'None'}: fwsvd supports sequence classification, "
        "token classification and causal LM heads; pass --task or save the model with its task head"
    )


#: Weight files that are Python pickles: loading them can run code, so they are refused unless
#: the caller allows them (and are then read with ``torch.load(weights_only=True)``).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Hub ids: "name" or "org/name", letters, digits and "-_." (as the hub allows).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def _looks_local(text: str) -> bool:
    """Whether a path that does not exist was meant as a local folder rather than a hub id.

    Hub ids are ``name`` or ``org/name``; anything starting with ``.``, ``/`` or ``~``, holding a
    backslash or more than one ``/``, not shaped like a hub id, or whose first part exists here
    (``out/typo`` when ``out/`` exists) is a local path.
    """
    if text.startswith((".", "/", "~")) or "\\" in text or text.strip("/").count("/") > 1:
        return True
    if not _HUB_ID.fullmatch(text) or ".." in text or "--" in text:
        return True
    head = text.split("/", 1)[0]
    return "/" in text and Path(head).expanduser().exists()


def model_source(model: str | os.PathLike) -> tuple[str, str | None]:
    """Resolve ``model`` to ``(path or hub id, gguf file name or None)``.

    Raises:
        ModelError: for a local-looking path that does not exist, one that holds no ``config.json``
            or ``.gguf`` file, or holds several ``.gguf`` files.
    """
    text = os.fspath(model)
    if not text.strip():
        raise ModelError("the model name is empty: pass a model folder or a hub id")
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if not path.exists():
        if isinstance(model, os.PathLike) or _looks_local(text):
            raise ModelError(f"model folder {text} does not exist: pass a folder with config.json and weights, or a hub id")
        return text, None  # a hub id such as "org/name"
    if not path.is_dir():
        raise ModelError(f"model {text} is a file, not a model folder: pass the folder that holds config.json")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ModelError(f"model folder {text} is not readable: check its permissions")
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if (path / "config.json").is_file():
        _read_json(path / "config.json", "restore the model's config.json")
        return str(path), None
    if len(ggufs) == 1:
        return str(path), ggufs[0]
    if len(ggufs) > 1:
        raise ModelError(f"model folder {text} holds several .gguf files ({', '.join(ggufs)}): pass the one to use as MODEL")
    raise ModelError(f"model folder {text} has no config.json or .gguf file: pass a Hugging Face model folder")


def _read_json(path: Path, fix: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ModelError(f"{path} is unreadable ({first_line(err)}): {fix}") from err


def check_no_custom_code(folder: str | os.PathLike) -> None:
    """Refuse a local model folder whose config or tokenizer config asks for code from the folder.

    transformers runs such code (``auto_map`` pointing at a ``.py`` file) only after a yes to its
    prompt; fwsvd never asks and never runs it.

    Raises:
        ModelError: when ``config.json`` or ``tokenizer_config.json`` names custom code.
    """
    folder = Path(folder)
    for name in ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        file = folder / name
        if not file.is_file():
            continue
        data = _read_json(file, f"restore the model's {name}")
        if isinstance(data, dict) and data.get("auto_map"):
            raise ModelError(
                f"{file} asks to run custom code from the model folder (auto_map): fwsvd never runs code from a model folder; "
                "use a model whose architecture is built into transformers"
            )


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a folder (the shards named by an index, or ``*.safetensors``)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index, "restore the index saved with the weight shards")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelError(f"{index} has no valid weight_map: restore the index saved with the weight shards")
        files = []
        for name in sorted(set(weight_map.values())):
            file = (folder / name).resolve()
            if file.parent != folder.resolve() or not file.is_file():
                raise ModelError(f"weight shard {name!r} named in {index} is missing: copy the complete model folder")
            files.append(file)
        return files
    return sorted(folder.glob("*.safetensors"))


def weight_shapes(folder: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, tuple[int, ...]] | None:
    """Shapes of the tensors in a local folder's safetensors weights, read from the file headers only.

    Returns ``None`` for a folder whose weights are pickles that ``allow_pickle`` lets through.

    Raises:
        ModelError: as :func:`weight_headers`.
    """
    headers = weight_headers(folder, allow_pickle=allow_pickle)
    return None if headers is None else {key: shape for key, (_, shape) in headers.items()}


def weight_headers(folder: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """``{tensor: (safetensors dtype, shape)}`` of a local folder's weights, read from the file headers only.

    Returns ``None`` for a folder whose weights are pickles that ``allow_pickle`` lets through.

    Raises:
        ModelError: for a folder without weights, with pickle weights only (unless allowed), or a
            safetensors file that is not valid.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    files = safetensors_files(folder)
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
        if pickles and not allow_pickle:
            raise ModelError(
                f"model folder {folder} holds only pickle weights ({', '.join(pickles[:3])}), which can run code when read: "
                "convert them to safetensors, or pass --allow-pickle if you trust this folder"
            )
        if pickles:
            return None
        raise ModelError(f"model folder {folder} has no weights (model.safetensors): copy the complete model folder")
    headers: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    headers[key] = (piece.get_dtype(), tuple(piece.get_shape()))
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelError(f"weights {file} are not a valid safetensors file ({first_line(err)}): copy the complete weights again") from err
    return headers


def _check_factors(shapes: dict[str, tuple[int, ...]], record: dict[str, Any] | None, model: str) -> None:
    """The low-rank factors in the weights must be exactly those of the record, at its ranks."""
    factors = {k.rsplit(".", 1)[0] for k in shapes if k.endswith(tuple(f".{f}" for f in FACTORS))}
    # Quantized layers carry their correction factors too (rank 0: empty ones).
    ranks = {**(record or {}).get("ranks", {}), **((record or {}).get("quantized_weights") or {}).get("ranks", {})}
    if factors and not ranks:
        example = sorted(factors)[0]
        raise ModelError(
            f"model {model} holds low-rank factors ({example}.weight_in, ...) but its config.json has no fwsvd compression record "
            "(quantization_config with ranks): restore the config.json saved with these weights"
        )
    for name, rank in ranks.items():
        for key, axis in ((f"{name}.weight_in", 0), (f"{name}.weight_out", 1)):
            shape = shapes.get(key)
            if shape is None:
                raise ModelError(f"the weights of {model} lack {key}, which config.json records at rank {rank}: copy the complete weights again")
            if len(shape) != 2 or shape[axis] != rank:
                raise ModelError(
                    f"config.json records rank {rank} for {name} but {key} in the weights has shape {list(shape)}: "
                    "the config does not match the weights; restore the config.json saved with them"
                )
    extra = sorted(factors - set(ranks))
    if extra:
        raise ModelError(f"the weights of {model} hold low-rank factors of {extra[0]}, which config.json does not record: restore the config.json saved with them")


#: safetensors dtypes a floating-point factor may be stored in (transformers casts them to the load dtype).
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _check_factor_dtypes(headers: dict[str, tuple[str, tuple[int, ...]]], record: dict[str, Any] | None, model: str) -> None:
    """Each low-rank factor is stored as the record says: floating point, or int8 with positive scales beside it.

    Read from the safetensors headers, before anything loads: an integer or boolean factor in a folder
    whose record does not say int8 would load as such and fail at the first matrix product.
    """
    ranks = (record or {}).get("ranks", {})
    quantized = ((record or {}).get("quantized_weights") or {}).get("ranks", {})
    _check_quantized_dtypes(headers, quantized, model)
    if not ranks:
        return
    from .int8 import SCALE_SUFFIX

    int8 = (record or {}).get("quantized_factors") == "int8"
    wanted = {f"{name}.{factor}" for name in ranks for factor in FACTORS}
    found = {key: header for key, header in headers.items() if key.removesuffix(SCALE_SUFFIX) in wanted}
    for key in sorted(wanted):
        dtype, shape = found[key]  # presence is checked by _check_factors
        if int8:
            if dtype != "I8":
                raise ModelError(f"factor {key} of {model} is stored as {dtype} but config.json records int8 factors: restore the weights saved with this config.json")
            scale = found.get(key + SCALE_SUFFIX)
            if scale is None:
                raise ModelError(f"the weights of {model} lack {key}{SCALE_SUFFIX}, the scales of the int8 factor {key}: copy the complete weights again")
            if scale[0] not in _FLOAT_DTYPES or scale[1] != shape[:1]:
                raise ModelError(
                    f"scales {key}{SCALE_SUFFIX} of {model} are {scale[0]} of shape {list(scale[1])}, not {shape[0]} floating-point values: "
                    "copy the complete weights again"
                )
        elif dtype not in _FLOAT_DTYPES:
            raise ModelError(
                f"factor {key} of {model} is stored as {dtype}, not floating point, and config.json does not record quantized factors: "
                "restore the config.json saved with these weights"
            )
        elif key + SCALE_SUFFIX in found:
            raise ModelError(f"the weights of {model} hold {key}{SCALE_SUFFIX}, scales of int8 factors that config.json does not record: restore the config.json saved with them")


def _check_quantized_dtypes(headers: dict[str, tuple[str, tuple[int, ...]]], ranks: dict[str, int], model: str) -> None:
    """Quantized layers store a uint8 grid, float16 scales and float16 correction factors."""
    wanted = {f"{name}.{part}": dtype for name in ranks for part, dtype in
              (("qweight", "U8"), ("scales", "F16"), ("weight_in", "F16"), ("weight_out", "F16"))}
    for key, expected in wanted.items():
        if key in headers and headers[key][0] != expected:
            raise ModelError(
                f"tensor {key} of {model} is stored as {headers[key][0]}, but a quantized layer stores it as {expected}: "
                "restore the weights saved with this config.json"
            )


def _check_loading_info(info: dict[str, Any], model: str) -> None:
    """Turn transformers' report of missing, unexpected or mis-shaped tensors into one error."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [], key=str)
    if mismatched:
        key, *shapes = mismatched[0] if isinstance(mismatched[0], tuple) else (mismatched[0],)
        detail = f" (weights {list(shapes[0])}, config {list(shapes[1])})" if len(shapes) == 2 else ""
        raise ModelError(
            f"tensor {key} of {model} does not have the shape its config.json implies{detail}; {len(mismatched)} tensor(s) differ: "
            "the config does not match the weights; restore the config.json saved with them"
        )
    if missing:
        raise ModelError(
            f"the weights of {model} lack {len(missing)} tensor(s) the model needs (e.g. {missing[0]}), which would be left random: "
            "copy the complete weights again"
        )
    if unexpected:
        raise ModelError(
            f"the weights of {model} hold {len(unexpected)} tensor(s) this model does not use (e.g. {unexpected[0]}): "
            "the config does not match the weights; restore the config.json saved with them"
        )
    errors = info.get("error_msgs") or []
    if errors:
        raise ModelError(f"cannot load the weights of {model} ({first_line(Exception(str(errors[0])))}): copy the complete weights again")


def check_record(config: Any) -> dict[str, Any] | None:
    """The validated fwsvd record of a loaded config, or ``None`` for a model without one.

    Raises:
        ModelError: for a malformed ``quantization_config``.
    """
    from .record import compression_record

    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict) and not hasattr(qc, "to_dict"):
        raise ModelError(f"quantization_config in config.json is {type(qc).__name__}, not an object: restore the config.json saved with the weights")
    return compression_record(config)


def auto_model_class(task: str) -> Any:
    import transformers

    return getattr(transformers, TASKS[task])


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as configs and records spell it: ``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def load_model(
    model: str | os.PathLike,
    task: str | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    need_tokenizer: bool = False,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a model (dense or fwsvd-compressed) and its tokenizer, without running code from the folder.

    Nothing in the folder is executed: ``trust_remote_code=False`` everywhere, a config that asks for
    custom code is refused, and pickle weights are refused unless ``allow_pickle`` (then read with
    ``weights_only=True``). The load is complete or fails: a missing, unused or mis-shaped tensor is
    an error, never a randomly initialised layer, and a compression record is validated before
    anything is built from it.

    Args:
        model: local folder (``config.json`` + safetensors, or a single ``.gguf``), ``.gguf`` file,
            or hub id.
        task: one of :data:`TASKS`; detected from the config when ``None``.
        dtype: load dtype; float32 by default (GGUF files are de-quantised to it), also for a folder
            saved with ``--dtype bfloat16``/``float16``, whose rounded weights are then computed with in
            float32; ``"auto"`` takes the dtype the folder records (``config.json``'s ``dtype``).
        need_tokenizer: raise when the tokenizer cannot be loaded instead of returning ``None``.
        allow_pickle: accept a folder whose weights are pickles (``pytorch_model.bin``).

    Raises:
        ModelError: for anything about the model the user can fix.
    """
    from transformers import AutoConfig, AutoTokenizer

    from .quantizer import register

    register()
    source, gguf_file = model_source(model)
    local = Path(source).is_dir()
    extra: dict[str, Any] = {"trust_remote_code": False}
    if gguf_file:
        extra["gguf_file"] = gguf_file
        missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
        if missing:
            raise ModelError(f"reading {gguf_file} needs the {' and '.join(missing)} package(s): pip install {' '.join(missing)}")
    headers = None
    if local:
        check_no_custom_code(source)
        if not gguf_file:
            headers = weight_headers(source, allow_pickle=allow_pickle)
    config = load_config(AutoConfig, source, model, extra)
    record = check_record(config)
    if task is None:
        # A GGUF file's config names no architecture; the format carries causal language models.
        task = "causal-lm" if gguf_file and not getattr(config, "architectures", None) else detect_task(config)
    elif task not in TASKS:
        raise ModelError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if headers is not None:
        _check_factors({key: shape for key, (_, shape) in headers.items()}, record, str(model))
        _check_factor_dtypes(headers, record, str(model))
    loaded = load_weights(auto_model_class(task), source, model, {**extra, **(_gguf_dense_options(gguf_file) if gguf_file else {})},
                           dtype=dtype, allow_pickle=allow_pickle or bool(gguf_file), strict_shapes=not gguf_file)
    if gguf_file:
        _drop_gguf_state(loaded)
        own_storage(loaded)
    loaded.eval()
    check_finite_weights(loaded, str(model))
    stored = (record or {}).get("stored_dtype")
    if stored is not None and dtype_name(loaded.dtype) != stored:
        logger.info("%s: weights stored as %s, computing in %s (dtype='auto' computes in the stored dtype)", model, stored, dtype_name(loaded.dtype))
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
        if need_tokenizer:
            raise ModelError(f"cannot load the tokenizer of {model} ({first_line(err)}): save the tokenizer files into the model folder") from err
        logger.warning("no tokenizer loaded for %s: %s", model, first_line(err))
    if tokenizer is not None and tokenizer.pad_token is None:
        # Decoder tokenizers often lack a pad token; padding positions are masked, so any id works.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer is not None and getattr(loaded.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        loaded.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(loaded, tokenizer, task, str(model))


def _config_errors() -> tuple[type[BaseException], ...]:
    """What building a config or a model from a bad config.json raises: type and value checks
    (huggingface_hub's strict dataclasses), arithmetic on zeros, lookups of missing fields."""
    errors: tuple[type[BaseException], ...] = (ValueError, KeyError, TypeError, AttributeError, IndexError, ArithmeticError)
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # pragma: no cover - older huggingface_hub
        return errors
    return (*errors, StrictDataclassError)


def load_config(auto_config: Any, source: str, model: Any, extra: dict[str, Any], **kwargs: Any) -> Any:
    """``AutoConfig.from_pretrained`` with config errors reported as such (never custom code)."""
    try:
        config = auto_config.from_pretrained(source, **extra, **kwargs)
    except ModelError:
        raise
    except (OSError, *_config_errors()) as err:
        if Path(source).is_dir():
            raise ModelError(f"cannot load config.json of {model} ({first_line(err)}): fix config.json or restore the one saved with the model") from err
        raise ModelError(f"cannot load the config of {model} ({first_line(err)}): pass a local model folder or check the hub id and network") from err
    if getattr(config, "auto_map", None):
        raise ModelError(f"the config of {model} asks to run custom code (auto_map): fwsvd never runs code from a model; use a model built into transformers")
    return config


def load_weights(
    auto_class: Any,
    source: str,
    model: Any,
    extra: dict[str, Any],
    *,
    dtype: Any,
    allow_pickle: bool,
    strict_shapes: bool = True,
    tolerate: Callable[[str], bool] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``from_pretrained`` that fails on anything but a complete load.

    Missing, unused and mis-shaped tensors raise (transformers would initialise them at random and
    only log a warning), except those ``tolerate`` accepts (a new task head); pickles are read with
    ``weights_only=True`` and only when allowed.
    """
    import pickle

    from safetensors import SafetensorError

    options: dict[str, Any] = {"output_loading_info": True, "weights_only": True}
    if strict_shapes:
        options["ignore_mismatched_sizes"] = True  # reported in the loading info, then refused below
    if not allow_pickle:
        options["use_safetensors"] = True
    try:
        loaded, info = auto_class.from_pretrained(source, dtype=dtype or torch.float32, **extra, **options, **kwargs)
    except ModelError:
        raise
    except pickle.UnpicklingError as err:
        # torch's message advises loading with weights_only=False, the very action that runs the
        # pickle's code: it is not repeated.
        raise ModelError(
            f"refused the pickle weights of {model}: they hold objects other than tensors, which could run code when read; "
            "convert them to safetensors where you trust them, or use another copy of the model"
        ) from err
    except (SafetensorError, EOFError) as err:
        raise ModelError(f"cannot read the weights of {model} ({first_line(err)}): copy the complete weights again, as safetensors") from err
    except OSError as err:
        raise ModelError(f"cannot load the weights of {model} ({first_line(err)}): check that the folder holds complete safetensors weights") from err
    except (RuntimeError, *_config_errors()) as err:
        raise ModelError(f"cannot build model {model} from its config.json ({first_line(err)}): fix config.json or restore the one saved with the weights") from err
    if tolerate is not None:
        info = {**info, **{k: {key for key in info.get(k) or () if not tolerate(key)} for k in ("missing_keys", "unexpected_keys")}}
    _check_loading_info(info, str(model))
    return loaded


def _gguf_dense_options(gguf_file: str) -> dict[str, Any]:
    """Ask transformers to unpack every GGUF weight into a plain dense tensor.

    Recent transformers can keep GGUF weights packed in special layers when a matmul kernel is
    installed; fwsvd factorizes dense ``nn.Linear`` weights, so it always asks for the dense form.
    Older releases always de-quantise and have no such option.
    """
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}


def _drop_gguf_state(model: nn.Module) -> None:
    """Forget that a de-quantised model came from GGUF, so ``save_pretrained`` writes plain safetensors.

    transformers keeps its GGUF loader attached to the model (and refuses to save it) even when
    every weight was de-quantised to a dense tensor; such a model is an ordinary dense model.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(quantizer.quantization_config, "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        return
    # Packed GGUF blocks are integer tensors; de-quantised weights are floating point.
    packed = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise ModelError(f"the GGUF weight {packed[0]} stayed packed: fwsvd needs de-quantised weights; update transformers")
    quantizer.remove_quantization_config(model)


def own_storage(model: nn.Module) -> int:
    """Give every parameter and buffer of ``model`` a contiguous tensor in storage of its own.

    transformers' GGUF reader de-quantises with numpy and hands the arrays to torch as they are:
    memory from numpy's allocator (not torch's 64-byte aligned one, and ``madvise``d as huge pages),
    possibly strided views of a permuted array or of a larger buffer. Such a model was measured to
    run its prefill markedly slower than the same weights copied into fresh tensors (issue 9).
    Tensors are replaced through ``.data``, so tied parameters stay one object and stay tied.

    Returns:
        The number of tensors copied.
    """
    copied = 0
    seen: set[int] = set()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if id(tensor) in seen or tensor.device.type == "meta":
                continue
            seen.add(id(tensor))
            tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
            copied += 1
    return copied


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
