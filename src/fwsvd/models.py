"""Loading models and tokenizers from local folders, GGUF files or the hub, and naming their task."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelError

logger = logging.getLogger(__name__)

__all__ = ["TASKS", "LoadedModel", "detect_task", "load_model", "model_source"]

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
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        for task in TASKS:
            if arch in _mapping_names(task):
                return task
    raise ModelError(
        f"cannot tell the task of architecture {archs or 'None'}: fwsvd supports sequence classification, "
        "token classification and causal LM heads; pass --task or save the model with its task head"
    )


def model_source(model: str | os.PathLike) -> tuple[str, str | None]:
    """Resolve ``model`` to ``(path or hub id, gguf file name or None)``.

    Raises:
        ModelError: for a local path that does not exist, holds no ``config.json`` or ``.gguf`` file,
            or holds several ``.gguf`` files.
    """
    text = os.fspath(model)
    path = Path(text).expanduser()
    # Hub ids are "name" or "org/name"; anything else that does not exist is a missing folder.
    looks_local = text.startswith((".", "/", "~")) or text.strip("/").count("/") > 1
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if not path.exists():
        if looks_local:
            raise ModelError(f"model folder {text} does not exist: pass a folder with config.json and weights, or a hub id")
        return text, None  # a hub id such as "org/name"
    if not path.is_dir():
        raise ModelError(f"model {text} is a file, not a model folder: pass the folder that holds config.json")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ModelError(f"model folder {text} is not readable: check its permissions")
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if (path / "config.json").is_file():
        try:
            json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelError(f"{path / 'config.json'} is unreadable ({err}): restore the model's config.json") from err
        return str(path), None
    if len(ggufs) == 1:
        return str(path), ggufs[0]
    if len(ggufs) > 1:
        raise ModelError(f"model folder {text} holds several .gguf files ({', '.join(ggufs)}): pass the one to use as MODEL")
    raise ModelError(f"model folder {text} has no config.json or .gguf file: pass a Hugging Face model folder")


def _auto_class(task: str) -> Any:
    import transformers

    return getattr(transformers, TASKS[task])


def load_model(
    model: str | os.PathLike,
    task: str | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    need_tokenizer: bool = False,
) -> LoadedModel:
    """Load a model (dense or fwsvd-compressed) and its tokenizer.

    Args:
        model: local folder (``config.json`` + safetensors, or a single ``.gguf``), ``.gguf`` file,
            or hub id.
        task: one of :data:`TASKS`; detected from the config when ``None``.
        dtype: load dtype; float32 by default (GGUF files are de-quantised to it).
        need_tokenizer: raise when the tokenizer cannot be loaded instead of returning ``None``.

    Raises:
        ModelError: for anything about the model the user can fix.
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoTokenizer

    from . import hf

    hf.register()
    source, gguf_file = model_source(model)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file:
        missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
        if missing:
            raise ModelError(f"reading {gguf_file} needs the {' and '.join(missing)} package(s): pip install {' '.join(missing)}")
    try:
        config = AutoConfig.from_pretrained(source, **extra)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load the config of {model} ({_first_line(err)}): pass a local model folder or check the hub id and network") from err
    if task is None:
        # A GGUF file's config names no architecture; the format carries causal language models.
        task = "causal-lm" if gguf_file and not getattr(config, "architectures", None) else detect_task(config)
    elif task not in TASKS:
        raise ModelError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    model_extra = {**extra, **_gguf_dense_options(gguf_file)} if gguf_file else extra
    try:
        loaded = _auto_class(task).from_pretrained(source, dtype=dtype or torch.float32, **model_extra)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise ModelError(f"cannot load model {model} ({_first_line(err)}): check that the folder holds complete safetensors weights") from err
    if gguf_file:
        _drop_gguf_state(loaded)
    loaded.eval()
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError, KeyError, TypeError) as err:
        if need_tokenizer:
            raise ModelError(f"cannot load the tokenizer of {model} ({_first_line(err)}): save the tokenizer files into the model folder") from err
        logger.warning("no tokenizer loaded for %s: %s", model, _first_line(err))
    if tokenizer is not None and tokenizer.pad_token is None:
        # Decoder tokenizers often lack a pad token; padding positions are masked, so any id works.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer is not None and getattr(loaded.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        loaded.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(loaded, tokenizer, task, str(model))


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


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
