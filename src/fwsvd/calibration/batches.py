"""Calibration batches: the examples or token blocks a calibration runs on."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import DataError, ModelError
from ..storage.loading import LoadedModel
from ..config import CalibrationConfig


def calibration_batches(loaded: LoadedModel, config: CalibrationConfig, *, labels: bool = True) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """Tokenized calibration batches for the model's task, and a summary of where they came from.

    Raises:
        DataError: for missing, empty or unusable data.
        ModelError: when the model has no tokenizer.
    """
    from .. import data as d

    if config.data is None:
        raise DataError("this method needs calibration data: pass --data with a training file")
    if loaded.tokenizer is None:
        raise ModelError(f"{loaded.source} has no tokenizer: save the tokenizer files into the model folder")
    cfg = config.resolved(loaded.task)
    tok = loaded.tokenizer
    summary: dict[str, Any] = {"data": str(cfg.data), "seed": cfg.seed, "max_length": cfg.max_length, "batch_size": cfg.batch_size}
    if loaded.task == "causal-lm":
        ids = d.causal_blocks_from_file(tok, cfg.data, cfg.max_length, samples=cfg.samples, seed=cfg.seed)
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
        targets, _, _ = d.model_label_mapping(examples.labels, loaded.model.config, source=str(cfg.data))
    return list(d.batches(items, cfg.batch_size, tok.pad_token_id, labels=targets)), summary


def covariance_batches(
    loaded: LoadedModel, config: CalibrationConfig, taken: list[dict[str, torch.Tensor]]
) -> list[dict[str, torch.Tensor]]:
    """The forward-only batches that ``config.cov_samples`` adds to the input covariance: examples (or
    blocks) of ``cov_samples`` drawn with the same seed that the ``samples`` of
    :func:`calibration_batches` (``taken``, what it returned) do not already hold, up to
    ``cov_samples - samples`` of them, without labels. Empty when ``cov_samples`` is unset or not
    above ``samples``.

    Raises:
        DataError: for missing, empty or unusable data.
    """
    from .. import data as d

    cfg = config.resolved(loaded.task)
    assert cfg.samples is not None and cfg.batch_size is not None and cfg.max_length is not None
    if cfg.cov_samples is None or cfg.cov_samples <= cfg.samples or cfg.data is None or loaded.tokenizer is None:
        return []
    tok = loaded.tokenizer
    room = cfg.cov_samples - cfg.samples
    if loaded.task == "causal-lm":
        wider = d.causal_blocks_from_file(tok, cfg.data, cfg.max_length, samples=cfg.cov_samples, seed=cfg.seed)
        # The draw keeps the file's order, so blocks are told apart by their tokens (two equal blocks
        # of text carry the same statistics anyway).
        seen = {tuple(row.tolist()) for batch in taken for row in batch["input_ids"]}
        extra = [row for row in wider if tuple(row.tolist()) not in seen][:room]
        if not extra:
            return []
        ids = torch.stack(extra)
        return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(cfg.batch_size)]
    if loaded.task == "token-classification":
        examples = d.read_token_labelled(cfg.data)
        extra_rows = _extra_rows(len(examples), cfg.samples, cfg.cov_samples, cfg.seed)
        mc = loaded.model.config
        items, _ = d.encode_token_examples(
            tok, examples.subset(extra_rows), cfg.max_length, num_labels=mc.num_labels, label2id=getattr(mc, "label2id", None)
        )
        return list(d.batches(items, cfg.batch_size, tok.pad_token_id, labels=None))
    examples = d.read_labelled(cfg.data, text_column=cfg.text_column, pair_column=cfg.pair_column, label_column=cfg.label_column)
    extra_rows = _extra_rows(len(examples), cfg.samples, cfg.cov_samples, cfg.seed)
    items = d.encode_examples(tok, _subset(examples, extra_rows), cfg.max_length)
    return list(d.batches(items, cfg.batch_size, tok.pad_token_id, labels=None))


def _extra_rows(n: int, samples: int, cov_samples: int, seed: int) -> list[int]:
    """Rows of the ``cov_samples`` draw outside the ``samples`` draw, at most ``cov_samples - samples``, in file order."""
    from .. import data as d

    taken = set(d.draw(n, samples, seed))
    return [i for i in d.draw(n, cov_samples, seed) if i not in taken][: cov_samples - samples]


def _subset(examples: Any, keep: list[int]) -> Any:
    from dataclasses import replace

    pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
    return replace(examples, texts=pick(examples.texts), text_pairs=pick(examples.text_pairs), labels=pick(examples.labels))
