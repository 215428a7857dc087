"""Tests for fwsvd.finetune and the ``finetune`` / ``compress --finetune-*`` commands.

Everything is built offline: a tiny BERT from a config and a word-level tokenizer made with the
``tokenizers`` library; the data are small generated files in GLUE layouts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import fwsvd
from fwsvd.cli import main
from fwsvd.errors import DataError, FwsvdError, ModelError
from fwsvd.evaluate import EvalConfig, evaluate
from fwsvd.finetune import FinetuneConfig, _epoch_batches, finetune, head_config, load_for_finetune
from fwsvd.hf import compression_record
from fwsvd.nn import LowRankLinear

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
POSITIVE = ["good", "great", "fine", "nice", "fun"]
NEGATIVE = ["bad", "poor", "dull", "boring", "awful"]
FILLER = "the a movie film story plot actor scene music cast it is was very not so and with of day night".split()
WORDS = POSITIVE + NEGATIVE + FILLER


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", model_max_length=64
    )


def _config(**kw):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=0, **kw,
    )


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    """A pretrained-encoder folder: a bare ``BertModel`` (no task head) and its tokenizer."""
    from transformers import BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("encoder")
    BertModel(_config()).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("classifier")
    BertForSequenceClassification(_config(num_labels=2)).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def _sentence(rng: random.Random, adjective: str) -> str:
    words = rng.sample(FILLER, 4)
    return " ".join(words[:2] + [adjective] + words[2:])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Tiny files in SST-2, RTE (string labels), MRPC and STS-B layouts."""
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("glue")
    sst2, rte, mrpc, stsb = ["sentence\tlabel"], ["index\tsentence1\tsentence2\tlabel"], ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"], ["sentence1\tsentence2\tscore"]
    for i in range(32):
        label = i % 2
        a = _sentence(rng, rng.choice(POSITIVE if label else NEGATIVE))
        b = _sentence(rng, rng.choice(POSITIVE if label else NEGATIVE))
        sst2.append(f"{a}\t{label}")
        rte.append(f"{i}\t{a}\t{b}\t{'entailment' if label else 'not_entailment'}")
        mrpc.append(f"{label}\t{i}\t{i + 100}\t{a}\t{b}")
        stsb.append(f"{a}\t{b}\t{rng.uniform(0, 5):.3f}")
    paths = {}
    for name, lines in (("sst2", sst2), ("rte", rte), ("mrpc", mrpc), ("stsb", stsb)):
        paths[name] = folder / f"{name}.tsv"
        paths[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def _run(argv: list[str], capsys) -> dict:
    code = main([*argv, "--json", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


# --- units ------------------------------------------------------------------------------------------


def test_head_config_classes_strings_and_regression():
    assert head_config([0, 1, 2, 1]) == {"num_labels": 3, "problem_type": "single_label_classification"}
    strings = head_config(["pos", "neg", "pos"])
    assert strings["num_labels"] == 2
    assert strings["label2id"] == {"neg": 0, "pos": 1} and strings["id2label"] == {0: "neg", 1: "pos"}
    assert head_config([0.5, 3.2, 5.0]) == {"num_labels": 1, "problem_type": "regression"}
    # STS-B scores that happen to be whole numbers are still a regression.
    assert head_config([1, 4, 5], layout="stsb")["problem_type"] == "regression"
    with pytest.raises(DataError, match="single class"):
        head_config([0, 0])
    with pytest.raises(DataError):
        head_config([])


def test_epoch_batches_are_seeded_cover_everything_and_group_lengths():
    rng = random.Random(1)
    lengths = [rng.randint(1, 50) for _ in range(250)]
    a = _epoch_batches(lengths, 8, torch.Generator().manual_seed(3), group=True)
    b = _epoch_batches(lengths, 8, torch.Generator().manual_seed(3), group=True)
    assert a == b
    assert sorted(i for batch in a for i in batch) == list(range(250))
    spread = sum(max(lengths[i] for i in batch) - min(lengths[i] for i in batch) for batch in a)
    plain = _epoch_batches(lengths, 8, torch.Generator().manual_seed(3), group=False)
    assert spread < sum(max(lengths[i] for i in batch) - min(lengths[i] for i in batch) for batch in plain)


def test_config_validation():
    with pytest.raises(FwsvdError, match="epochs"):
        FinetuneConfig(data="x.tsv", epochs=0)
    with pytest.raises(FwsvdError, match="lr"):
        FinetuneConfig(data="x.tsv", lr=-1.0)
    with pytest.raises(DataError):
        FinetuneConfig(data="")
    assert FinetuneConfig(data="x.tsv").resolved(compressed=True).epochs == 1
    assert FinetuneConfig(data="x.tsv").resolved(compressed=False).epochs == 3


# --- fine-tuning ----------------------------------------------------------------------------------------


def test_fresh_head_learns_and_is_seeded(encoder_dir, data):
    config = FinetuneConfig(data=str(data["sst2"]), epochs=4, lr=2e-3, batch_size=8, max_length=16, warmup=0.0)
    runs = []
    for _ in range(2):
        loaded = load_for_finetune(encoder_dir, config)
        assert type(loaded.model).__name__ == "BertForSequenceClassification"
        summary = finetune(loaded, config, progress=False)
        runs.append((summary, loaded.model.classifier.weight.detach().clone()))
    (summary, w1), (_, w2) = runs
    assert torch.equal(w1, w2), "same seed, same run"
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]
    assert summary["steps"] == 4 * 4 and summary["rows"] == 32 and not summary["compressed"]
    assert loaded.model.config.fwsvd_finetune["epochs"] == 4
    assert not loaded.model.training


def test_finetune_compressed_keeps_ranks_and_reloads(classifier_dir, data, tmp_path):
    loaded = fwsvd.load_model(classifier_dir)
    fwsvd.compress(loaded.model, fwsvd.CompressConfig(method="svd", keep=0.5), progress=False)
    ranks = {n: m.rank for n, m in loaded.model.named_modules() if isinstance(m, LowRankLinear)}
    assert ranks
    layer = next(m for m in loaded.model.modules() if isinstance(m, LowRankLinear))
    before = (layer.weight_in.detach().clone(), layer.weight_out.detach().clone())
    summary = finetune(loaded, FinetuneConfig(data=str(data["sst2"]), batch_size=8, max_length=16), progress=False)
    assert summary["compressed"] and summary["epochs"] == 1 and summary["lr"] == pytest.approx(1e-4)
    # The factors themselves were trained.
    assert not torch.equal(before[0], layer.weight_in) and not torch.equal(before[1], layer.weight_out)
    out = fwsvd.save(loaded.model, tmp_path / "tuned", loaded.tokenizer)
    record = json.loads((out / "config.json").read_text())["quantization_config"]
    assert record["quant_method"] == "fwsvd" and record["finetune"]["epochs"] == 1 and record["finetune"]["data"] == str(data["sst2"])
    back = fwsvd.load_model(out)
    assert {n: m.rank for n, m in back.model.named_modules() if isinstance(m, LowRankLinear)} == ranks
    assert fwsvd.inspect(back.model)["target_keep"] == pytest.approx(fwsvd.inspect(loaded.model)["target_keep"])
    batch = loaded.tokenizer(["good movie", "bad plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(back.model(**batch).logits, loaded.model(**batch).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "keys", "metric"),
    [
        ("rte", {"accuracy", "mcc", "f1"}, "accuracy"),
        ("mrpc", {"accuracy", "mcc", "f1"}, "f1"),
        ("stsb", {"pearson", "spearman", "mse"}, "pearson"),
    ],
)
def test_cli_finetune_pair_and_regression_tasks(encoder_dir, data, tmp_path, capsys, name, keys, metric):
    out = tmp_path / name
    path = str(data[name])
    result = _run(["finetune", str(encoder_dir), "--data", path, "--eval-data", path, "--out", str(out), "--epochs", "2",
                   "--lr", "1e-3", "--batch-size", "8", "--max-length", "24"], capsys)
    assert result["metric"] == metric and len(result["history"]) == 2 and result["best_epoch"] in (1, 2)
    config = json.loads((out / "config.json").read_text())
    if name == "stsb":
        assert len(config["id2label"]) == 1
        assert config["problem_type"] == "regression"
    if name == "rte":
        assert config["label2id"] == {"entailment": 0, "not_entailment": 1}
    scored = _run(["eval", str(out), "--data", path], capsys)
    assert keys <= set(scored) and scored["metric"] == metric
    assert scored[metric] == pytest.approx(result["eval"][metric], abs=1e-6)


def test_cli_compress_with_recovery_finetune(classifier_dir, data, tmp_path, capsys):
    out = tmp_path / "fw"
    result = _run(["compress", str(classifier_dir), "--out", str(out), "--method", "fwsvd", "--keep", "0.4", "--data", str(data["sst2"]),
                   "--finetune-epochs", "2", "--finetune-data", str(data["sst2"]), "--finetune-lr", "3e-4"], capsys)
    assert result["finetune"]["epochs"] == 2 and result["finetune"]["lr"] == pytest.approx(3e-4)
    assert result["finetune"]["compressed"]
    info = _run(["inspect", str(out)], capsys)
    assert info["compressed"] and info["target_keep"] == pytest.approx(result["target_keep"])
    record = json.loads((out / "config.json").read_text())["quantization_config"]
    assert record["finetune"]["steps"] == 2 * 2 and record["finetune"]["batch_size"] == 16  # 32 rows
    # The table form mentions the fine-tuning too.
    assert main(["compress", str(classifier_dir), "--out", str(tmp_path / "svd"), "--method", "svd", "--keep", "0.4", "--quiet",
                 "--finetune-data", str(data["sst2"]), "--finetune-limit", "20", "--max-length", "16"]) == 0
    assert "fine-tuned 1 epoch(s) on 20 rows" in capsys.readouterr().out
    # Without --data the recovery data calibrates too.
    result = _run(["compress", str(classifier_dir), "--out", str(tmp_path / "nodata"), "--method", "fwsvd", "--keep", "0.4",
                   "--finetune-data", str(data["sst2"]), "--finetune-limit", "8", "--max-length", "16"], capsys)
    assert result["calibration"]["data"] == str(data["sst2"]) and result["calibration"]["samples"] == 32


def test_cli_errors_are_one_line(classifier_dir, encoder_dir, data, tmp_path, capsys):
    assert main(["compress", str(classifier_dir), "--out", str(tmp_path / "x"), "--method", "svd", "--keep", "0.5", "--finetune-epochs", "1", "--quiet"]) == 2
    assert "--finetune-data" in capsys.readouterr().err
    assert main(["finetune", str(encoder_dir), "--data", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "y"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err
    assert not (tmp_path / "y").exists()
    # Three classes for a two-class head: the error names the fix.
    three = tmp_path / "three.tsv"
    three.write_text("sentence\tlabel\ngood\t0\nbad\t1\nfun\t2\n", encoding="utf-8")
    assert main(["finetune", str(classifier_dir), "--data", str(three), "--out", str(tmp_path / "z"), "--quiet"]) == 2
    assert "classes" in capsys.readouterr().err


def test_finetune_rejects_non_classifiers(data, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=32)).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    with pytest.raises(ModelError, match="causal-lm"):
        load_for_finetune(folder, FinetuneConfig(data=str(data["sst2"])))


def test_eval_of_finetuned_pair_model_in_process(encoder_dir, data):
    config = FinetuneConfig(data=str(data["mrpc"]), epochs=1, lr=1e-3, batch_size=8, max_length=24)
    loaded = load_for_finetune(encoder_dir, config)
    finetune(loaded, config, progress=False)
    result = evaluate(loaded, EvalConfig(data=str(data["mrpc"]), max_length=24), progress=False)
    assert result["metric"] == "f1" and {"accuracy", "f1", "mcc"} <= set(result)
    assert compression_record(loaded.model.config) is None
