"""ONNX export (fwsvd.export.onnx, ``fwsvd export``) and onnxruntime scoring through ``fwsvd eval``.

Tolerances: float32 ONNX Runtime logits equal PyTorch's within ``FLOAT_TOLERANCE`` (1e-4) on every
input shape tried; dynamic int8 logits are within 0.05 of PyTorch's on the tiny BERT (|logit| ~ 0.1-1)
and, on MiniLM SST-2 dev, score within 0.01 of PyTorch's accuracy and predict the same class on at least 93 % of sentences.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import pytest
import torch
from conftest import folder_digest
from test_cli import SMALL, assert_one_line_error, run

import fwsvd
from fwsvd.export.onnx import FLOAT_TOLERANCE, MARKER_FILE, export_onnx, is_export_folder, load_onnx, read_marker
from fwsvd.errors import ModelError
from fwsvd.nn import LowRankLinear

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MINILM = SHARED / "models" / "minilm-l6-sst2"
SST2_DEV = SHARED / "data" / "sst2" / "dev.tsv"


@pytest.fixture(scope="module")
def compressed_bert(tmp_path_factory, bert_dir, sst2_tsv) -> Path:
    """The tiny BERT compressed by fwsvd (Fisher calibrated on the tiny SST-2 file): some layers low-rank."""
    from fwsvd.cli import main

    out = tmp_path_factory.mktemp("fwsvd-bert") / "model"
    assert main(["compress", str(bert_dir), "--out", str(out), "--keep", "0.5", "--data", str(sst2_tsv), "--allocation", "uniform", *SMALL]) == 0
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, compressed_bert) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    export_onnx(compressed_bert, root / "float")
    export_onnx(compressed_bert, root / "int8", int8=True)
    return {"float": root / "float", "int8": root / "int8"}


def _inputs(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, max(1, length - 3) :] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _weight_matmuls(path: Path) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    """(op type, weight shape) of every product whose second input is an initializer, and the float MatMuls among them."""
    graph = onnx.load(str(path)).graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    found = [(n.op_type, shapes[n.input[1]]) for n in graph.node if ("MatMul" in n.op_type or n.op_type == "Gemm") and n.input[1] in shapes]
    return found, sum(1 for op, _ in found if op == "MatMul")


def test_float32_equals_pytorch_on_every_shape(compressed_bert, exported):
    reference = fwsvd.load_model(compressed_bert).model
    assert any(isinstance(m, LowRankLinear) for m in reference.modules())
    model = load_onnx(exported["float"]).model
    for batch, length, seed in [(1, 5, 0), (4, 16, 1), (2, 40, 2)]:  # none is the export's own 2 x 16
        inputs = _inputs(batch, length, seed)
        with torch.no_grad():
            expected = reference(**inputs).logits
        got = model(**inputs).logits
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= FLOAT_TOLERANCE


def test_low_rank_layers_are_two_matmuls_and_int8_quantizes_both(compressed_bert, exported):
    reference = fwsvd.load_model(compressed_bert).model
    low_rank = [m for m in reference.modules() if isinstance(m, LowRankLinear)]
    dense = [m for m in reference.modules() if isinstance(m, torch.nn.Linear)]
    float_products, float_matmuls = _weight_matmuls(exported["float"] / "model.onnx")
    # every linear is one product, a low-rank one two (the pooler and classifier, on 2-D inputs, export as Gemm)
    assert len(float_products) == len(dense) + 2 * len(low_rank)
    int8_products, int8_float_matmuls = _weight_matmuls(exported["int8"] / "model.onnx")
    assert int8_float_matmuls == 0  # no weight MatMul left in float32
    quantized = [shape for op, shape in int8_products if op == "MatMulInteger"]
    assert float_matmuls == len(float_products) - 2 and len(quantized) == len(float_products)  # every product, Gemms too
    for m in low_rank:  # both factors of each low-rank layer, as [in, rank] and [rank, out]
        assert (m.in_features, m.rank) in quantized and (m.rank, m.out_features) in quantized
    marker = read_marker(exported["int8"])
    assert marker["int8"] is True and marker["low_rank_layers"] == len(low_rank) and marker["compressed"]["method"] == "fwsvd"


def test_attention_exports_without_sdpa_guards(compressed_bert, exported):
    # The eager attention: no IsNaN/Where guard per layer over the attention probabilities (SDPA's
    # exported form has one of each per layer); one Where at most, building the padding mask.
    layers = fwsvd.load_model(compressed_bert).model.config.num_hidden_layers
    ops = [n.op_type for n in onnx.load(str(exported["float"] / "model.onnx")).graph.node]
    assert ops.count("IsNaN") == 0 and ops.count("Where") <= 1
    assert ops.count("Softmax") == layers


def test_int8_within_its_tolerance(compressed_bert, exported):
    reference = fwsvd.load_model(compressed_bert).model
    inputs = _inputs(8, 24, 3)
    with torch.no_grad():
        expected = reference(**inputs).logits
    got = load_onnx(exported["int8"]).model(**inputs).logits
    assert (got - expected).abs().max() <= 0.05
    assert not torch.equal(got, expected)  # it did quantize


def test_cli_export_then_eval_scores_like_pytorch(capsys, tmp_path, compressed_bert, sst2_tsv):
    out = tmp_path / "exported"
    status, stdout, _ = run(capsys, "export", compressed_bert, "--onnx", out, "--json", "--quiet")
    assert status == 0
    summary = json.loads(stdout)
    assert summary["max_abs_diff"] <= FLOAT_TOLERANCE and summary["low_rank_layers"] > 0 and is_export_folder(out)
    scores = {}
    for folder in (compressed_bert, out):
        status, stdout, _ = run(capsys, "eval", folder, "--data", sst2_tsv, "--json", "--quiet")
        assert status == 0
        scores[folder] = json.loads(stdout)
    assert scores[out]["n"] == scores[compressed_bert]["n"] == 40
    assert scores[out]["accuracy"] == scores[compressed_bert]["accuracy"]
    assert scores[out]["task"] == "sequence-classification"


def test_import_fwsvd_does_not_import_onnx():
    import subprocess

    code = "import sys, fwsvd, fwsvd.cli; print(any(m.split('.')[0] in ('onnx', 'onnxruntime', 'onnxscript') for m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


@pytest.fixture
def occupied(tmp_path) -> Path:
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "precious.txt").write_text("do not touch", encoding="utf-8")
    return out


def test_bad_folders_are_one_line(capsys, tmp_path, bert_dir, exported, occupied):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("hello", encoding="utf-8")
    before = folder_digest(occupied)
    cases = [
        (["export", not_a_model, "--onnx", tmp_path / "a"], "not-a-model"),
        (["export", exported["float"], "--onnx", tmp_path / "b"], "already an ONNX export"),
        (["export", bert_dir, "--onnx", occupied], "--overwrite"),
        (["export", bert_dir, "--onnx", bert_dir], "model folder"),
        (["export", bert_dir, "--onnx", bert_dir / "inside"], "model folder"),
    ]
    for argv, needle in cases:
        status, _, err = run(capsys, *argv, "--quiet")
        assert status == 2
        assert_one_line_error(status, err, needle)
    assert folder_digest(occupied) == before
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_overwrite_replaces_an_export(capsys, bert_dir, occupied):
    status, stdout, _ = run(capsys, "export", bert_dir, "--onnx", occupied, "--overwrite", "--quiet")
    assert status == 0
    assert "float32" in stdout and "0 (two MatMuls each)" in stdout  # the human summary: a dense model
    assert not (occupied / "precious.txt").exists() and (occupied / MARKER_FILE).is_file()
    assert read_marker(occupied)["compressed"] is None  # a dense model exports too


@pytest.mark.parametrize(
    "marker, needle",
    [("{not json", "cannot read"), ('{"format": "fwsvd-onnx"}', "format_version"), ("[1, 2]", "not a JSON object")],
)
def test_tampered_marker_is_refused_by_eval(capsys, tmp_path, exported, sst2_tsv, marker, needle):
    import shutil

    folder = tmp_path / "tampered"
    shutil.copytree(exported["float"], folder)
    (folder / MARKER_FILE).write_text(marker, encoding="utf-8")
    with pytest.raises(ModelError, match=needle):
        read_marker(folder)
    status, _, err = run(capsys, "eval", folder, "--data", sst2_tsv, "--quiet")
    assert_one_line_error(status, err, needle)
    assert status == 2


@pytest.mark.skipif(not (MINILM / "config.json").is_file() or not SST2_DEV.is_file(), reason="needs ../shared (reference model and SST-2)")
def test_minilm_compressed_exports_equal_and_int8_agrees(tmp_path):
    from fwsvd import CompressConfig, compress
    from fwsvd.data import read_labelled

    loaded = fwsvd.load_model(MINILM)
    compress(loaded.model, CompressConfig(method="svd", keep=0.5, allocation="uniform"), None, task=loaded.task, progress=False)
    fwsvd.save(loaded.model, tmp_path / "svd", loaded.tokenizer)
    dev = read_labelled(SST2_DEV)
    labels = torch.tensor(dev.labels)
    batch = loaded.tokenizer(dev.texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        expected = loaded.model(**batch).logits
    for int8 in (False, True):
        out = tmp_path / ("int8" if int8 else "float")
        export_onnx(tmp_path / "svd", out, int8=int8)
        got = load_onnx(out).model(**batch).logits
        if int8:
            # Dynamic int8 on plain SVD at keep 0.5 (a model with many borderline sentences): the
            # issue's criterion, accuracy within 0.01 of PyTorch float32, on all 872 dev sentences
            # (measured +0.003), and the same prediction on nearly all of them (measured 0.955).
            int8_accuracy, float_accuracy = (float((x.argmax(-1) == labels).float().mean()) for x in (got, expected))
            assert abs(int8_accuracy - float_accuracy) <= 0.01
            assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.93
        else:
            assert (got - expected).abs().max() <= FLOAT_TOLERANCE


def test_quantized_folder_exports_dequantized(tmp_path, bert_dir, sst2_tsv):
    """A ``--quantize`` folder (int4 grid plus a low-rank correction) exports as Q(W) dense plus the correction's two MatMuls."""
    from fwsvd.cli import main
    from fwsvd.nn import QuantizedLinear

    folder = tmp_path / "q4"
    assert main(["compress", str(bert_dir), "--out", str(folder), "--quantize", "int4", "--group-size", "16", "--correction-rank", "4",
                 "--data", str(sst2_tsv), *SMALL]) == 0
    reference = fwsvd.load_model(folder).model
    assert any(isinstance(m, QuantizedLinear) and m.rank for m in reference.modules())
    result = export_onnx(folder, tmp_path / "onnx")
    assert result["quantized_layers"] > 0
    inputs = _inputs(2, 12, 4)
    with torch.no_grad():
        expected = reference(**inputs).logits
    assert (load_onnx(tmp_path / "onnx").model(**inputs).logits - expected).abs().max() <= FLOAT_TOLERANCE
