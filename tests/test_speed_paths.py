"""Inference paths: weights loaded from GGUF are ordinary tensors; fast forwards equal the plain one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import make_llama
from test_decoder import _write_tiny_gguf

import fwsvd
from fwsvd.models import own_storage


def _ordinary(tensor: torch.Tensor) -> bool:
    """Contiguous, at the start of a storage of exactly its size, from torch's (64-byte aligned) allocator."""
    return (
        tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        and tensor.data_ptr() % 64 == 0
    )


def test_own_storage_turns_numpy_views_into_ordinary_tensors():
    model = make_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    ids = torch.tensor([[2, 5, 9, 14, 3]])
    with torch.no_grad():
        expected = model(ids).logits
        # What a reader that de-quantises with numpy hands over: arrays (with numpy's alignment),
        # transposed views and slices of larger buffers.
        for n, p in enumerate(model.parameters()):
            array = p.detach().numpy()
            if p.ndim == 2 and n % 2:
                view = torch.from_numpy(np.ascontiguousarray(array.T)).t()
            else:
                buffer = np.zeros(array.size + 3, dtype=array.dtype)
                buffer[3:] = array.ravel()
                view = torch.from_numpy(buffer)[3:].view(p.shape)
            p.data = view
    assert not all(_ordinary(p) for p in model.parameters())
    assert own_storage(model) == len(list(model.parameters())) + len(list(model.buffers()))
    assert all(_ordinary(p) for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)


def test_gguf_loaded_weights_are_ordinary_tensors(tmp_path: Path):
    folder = tmp_path / "gguf-model"
    folder.mkdir()
    _write_tiny_gguf(folder / "tiny.gguf")
    model = fwsvd.load_model(folder).model
    bad = [name for name, p in model.named_parameters() if not _ordinary(p)]
    assert not bad, f"GGUF-loaded weights that are not ordinary tensors: {bad}"
