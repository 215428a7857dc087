"""Tests for fwsvd.training.finetune and the ``finetune`` / ``compress --finetune-*`` commands.

Everything is built offline: a tiny BERT and a tiny Llama from configs and word-level tokenizers
made with the ``tokenizers`` library; the data are small generated files in GLUE layouts and a
generated text with some structure for the causal LM.
"""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import low_rank_ranks

import fwsvd
from fwsvd.cli import main
from fwsvd.errors import DataError, FwsvdError, ModelError
from fwsvd.evaluation.evaluate import EvalConfig, evaluate
from fwsvd.training.finetune import DEFAULT_TOKENS, FinetuneConfig, _epoch_batches, finetune, head_config, load_for_finetune
from fwsvd.storage.record import compression_record
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
    ranks = low_rank_ranks(loaded.model)
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
    assert low_rank_ranks(back.model) == ranks
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


def test_finetune_rejects_other_tasks(data, tmp_path):
    from transformers import BertForTokenClassification

    folder = tmp_path / "ner"
    BertForTokenClassification(_config(num_labels=3)).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    with pytest.raises(ModelError, match="token-classification"):
        load_for_finetune(folder, FinetuneConfig(data=str(data["sst2"])))


def test_eval_of_finetuned_pair_model_in_process(encoder_dir, data):
    config = FinetuneConfig(data=str(data["mrpc"]), epochs=1, lr=1e-3, batch_size=8, max_length=24)
    loaded = load_for_finetune(encoder_dir, config)
    finetune(loaded, config, progress=False)
    result = evaluate(loaded, EvalConfig(data=str(data["mrpc"]), max_length=24), progress=False)
    assert result["metric"] == "f1" and {"accuracy", "f1", "mcc"} <= set(result)
    assert compression_record(loaded.model.config) is None


# --- causal LMs: recovery on next-token loss --------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_text(tmp_path_factory, bigram_txt) -> tuple[Path, Path]:
    """A tiny Llama folder (from conftest's builder and tokenizer) and conftest's bigram text to learn."""
    from conftest import make_llama, save_model

    return save_model(make_llama(), tmp_path_factory.mktemp("llama")), bigram_txt


def _compressed_llama(folder: Path) -> tuple["fwsvd.LoadedModel", torch.nn.Module]:
    """The tiny Llama compressed with plain SVD at keep 0.5, and a copy of the dense model."""
    loaded = fwsvd.load_model(folder)
    dense = copy.deepcopy(loaded.model)
    fwsvd.compress(loaded.model, fwsvd.CompressConfig(method="svd", keep=0.5), task="causal-lm", progress=False)
    return loaded, dense


def test_causal_config_defaults_and_validation():
    causal = FinetuneConfig(data="x.txt").resolved(compressed=True, task="causal-lm")
    assert (causal.tokens, causal.epochs, causal.max_length, causal.train) == (DEFAULT_TOKENS, None, 512, "low-rank")
    assert FinetuneConfig(data="x.txt").resolved(compressed=False, task="causal-lm").train == "all"
    assert FinetuneConfig(data="x.txt", epochs=2).resolved(compressed=True, task="causal-lm").tokens is None
    assert FinetuneConfig(data="x.tsv").resolved(compressed=True).max_length == 128
    with pytest.raises(FwsvdError, match="tokens"):
        FinetuneConfig(data="x.txt", tokens=0)
    with pytest.raises(FwsvdError, match="one of them"):
        FinetuneConfig(data="x.txt", tokens=100, epochs=1)
    with pytest.raises(FwsvdError, match="holdout"):
        FinetuneConfig(data="x.txt", holdout=0.0)
    with pytest.raises(FwsvdError, match="train"):
        FinetuneConfig(data="x.txt", train="everything")
    # Causal-LM settings on a classifier are refused, not ignored.
    with pytest.raises(FwsvdError, match="causal"):
        FinetuneConfig(data="x.tsv", tokens=100).resolved(compressed=True)
    with pytest.raises(FwsvdError, match="causal"):
        FinetuneConfig(data="x.tsv", distill=True).resolved(compressed=True)


def test_causal_recovery_lowers_the_loss_keeps_ranks_and_reloads(llama_text, tmp_path):
    folder, text = llama_text
    loaded, _ = _compressed_llama(folder)
    ranks = low_rank_ranks(loaded.model)
    embedding = loaded.model.get_input_embeddings().weight.detach().clone()
    layer = next(m for m in loaded.model.modules() if isinstance(m, LowRankLinear))
    factors = layer.weight_in.detach().clone()
    config = FinetuneConfig(data=str(text), epochs=3, lr=3e-3, batch_size=4, max_length=16)
    summary = finetune(loaded, config, progress=False)

    history = summary["history"]
    assert [h["step"] for h in history] == [0, 20, 40, 60]  # 87 blocks: 8 held out, 79 train in 20 batches of 4
    assert (summary["blocks"], summary["heldout_blocks"], summary["tokens"]) == (79, 8, 3 * 79 * 16)
    assert history[-1]["loss"] < history[1]["loss"]  # the mean training loss falls epoch by epoch
    assert summary["eval"]["perplexity"] < summary["initial_perplexity"]
    assert summary["eval"]["perplexity"] == pytest.approx(min(h["perplexity"] for h in history))
    assert summary["cpu_seconds"] > 0 and summary["seconds"] > 0
    # Ranks stay; only the low-rank factors train by default.
    assert low_rank_ranks(loaded.model) == ranks and summary["train"] == "low-rank"
    assert not torch.equal(factors, layer.weight_in)
    assert torch.equal(embedding, loaded.model.get_input_embeddings().weight)
    assert all(p.requires_grad for p in loaded.model.parameters()), "frozen parameters are given back"
    assert not loaded.model.training

    out = fwsvd.save(loaded.model, tmp_path / "recovered", loaded.tokenizer)
    record = json.loads((out / "config.json").read_text())["quantization_config"]["finetune"]
    assert record["task"] == "causal-lm" and record["tokens"] == summary["tokens"] and record["cpu_seconds"] == summary["cpu_seconds"]
    assert record["perplexity"] == pytest.approx(summary["eval"]["perplexity"], rel=1e-6)
    assert [h["step"] for h in record["history"]] == [0, 20, 40, 60]
    back = fwsvd.load(out)
    assert low_rank_ranks(back) == ranks
    ids = torch.tensor([[5, 9, 13, 40, 41, 7]])
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, loaded.model(input_ids=ids).logits, rtol=0, atol=1e-5)


def _heldout_perplexity(loaded: "fwsvd.LoadedModel", text: Path) -> float:
    """The held-out perplexity of the model as it is: the starting point of a run with the same split (seed, blocks)."""
    probe = FinetuneConfig(data=str(text), tokens=64, lr=1e-12, batch_size=4, max_length=16)
    return finetune(copy.deepcopy(loaded), probe, progress=False)["history"][0]["perplexity"]


def test_causal_recovery_keeps_the_best_heldout_state(llama_text, monkeypatch):
    folder, text = llama_text
    loaded, _ = _compressed_llama(folder)
    # Which state is best must follow from the setup, not from one CPU's rounding: the held-out
    # losses are scripted (better, better, best at step 2, then worse and non-finite), and each
    # evaluated state is recorded, so the state kept is known exactly.
    import fwsvd.training.finetune as ft

    script = iter([3.0, 2.5, 2.0, 2.4, 2.9, float("nan"), 3.5, 4.0, 4.5])
    seen: list[dict[str, torch.Tensor]] = []

    def scripted_nll(model, blocks, batch_size):
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return next(script)

    monkeypatch.setattr(ft, "block_nll", scripted_nll)
    run = FinetuneConfig(data=str(text), tokens=16 * 4 * 8, lr=3e-3, batch_size=4, max_length=16, warmup=0.0, eval_steps=1)
    summary = finetune(loaded, run, progress=False)
    monkeypatch.undo()
    assert len(seen) == 9 and [h["step"] for h in summary["history"]] == list(range(9))
    assert summary["best_step"] == 2 and summary["eval"]["perplexity"] == pytest.approx(math.exp(2.0))
    assert any(not torch.equal(seen[2][n], seen[-1][n]) for n in seen[2]), "training went on after the best step"
    for name, p in loaded.model.named_parameters():
        assert torch.equal(p, seen[2][name]), name

    # A learning rate so large that AdamW's first step (about lr per weight) overflows the factors'
    # products to inf, so every later loss is non-finite: nothing is better than the start, whose
    # state comes back bit for bit and the run stops with a message.
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    overflowing = FinetuneConfig(data=str(text), tokens=16 * 4 * 8, lr=1e30, batch_size=4, max_length=16, warmup=0.0, eval_steps=1)
    summary = finetune(loaded, overflowing, progress=False)
    assert summary["best_step"] == 0 and len(summary["history"]) > 1 and summary["stopped"] is not None
    assert summary["eval"]["perplexity"] == pytest.approx(summary["history"][0]["perplexity"])
    for name, p in loaded.model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_causal_distillation_runs_and_needs_the_dense_model(llama_text):
    folder, text = llama_text
    loaded, dense = _compressed_llama(folder)
    teacher_state = {n: p.detach().clone() for n, p in dense.named_parameters()}
    config = FinetuneConfig(data=str(text), tokens=16 * 4 * 6, lr=3e-3, batch_size=4, max_length=16, distill=True, eval_steps=3)
    with pytest.raises(FwsvdError, match="dense model"):
        finetune(loaded, config, progress=False)
    summary = finetune(loaded, config, progress=False, teacher=dense)
    assert summary["distill"] and summary["steps"] == 6
    kls = [h["kl"] for h in summary["history"][1:]]
    assert len(kls) == 2 and all(k is not None and 0 <= k < 10 for k in kls)
    assert summary["eval"]["perplexity"] <= summary["initial_perplexity"]
    # The teacher only runs forward.
    assert all(torch.equal(p, teacher_state[n]) for n, p in dense.named_parameters())


def test_causal_recovery_needs_two_blocks(llama_text, tmp_path):
    folder, _ = llama_text
    short = tmp_path / "short.txt"
    short.write_text("the cat sat on the mat and the dog ran in the park on a day\n", encoding="utf-8")
    loaded, _ = _compressed_llama(folder)
    with pytest.raises(DataError, match="at least 2"):
        finetune(loaded, FinetuneConfig(data=str(short), max_length=10), progress=False)  # 16 words: one block


def test_cli_compress_causal_lm_with_recovery(llama_text, tmp_path, capsys):
    folder, text = llama_text
    out = tmp_path / "rec"
    result = _run(["compress", str(folder), "--out", str(out), "--method", "svd-llm", "--keep", "0.5", "--data", str(text),
                   "--samples", "8", "--max-length", "16", "--finetune-data", str(text), "--finetune-tokens", "1000",
                   "--finetune-lr", "3e-3", "--finetune-distill"], capsys)
    summary = result["finetune"]
    assert summary["task"] == "causal-lm" and summary["distill"] and summary["max_length"] == 16
    assert summary["steps"] == 16 and summary["tokens"] == 16 * 4 * 16  # ceil(1000 / (4 x 16)) steps of 4 blocks
    assert summary["cpu_seconds"] > 0 and summary["eval"]["perplexity"] <= summary["initial_perplexity"]
    record = json.loads((out / "config.json").read_text())["quantization_config"]
    assert record["finetune"]["tokens"] == summary["tokens"] and record["finetune"]["lr"] == pytest.approx(3e-3)
    back = fwsvd.load(out)
    assert low_rank_ranks(back) == {k: int(v) for k, v in record["ranks"].items()}
    scored = _run(["eval", str(out), "--data", str(text), "--max-length", "16"], capsys)
    assert scored["metric"] == "perplexity" and scored["perplexity"] > 1
    # The table form names the recovery, and `fwsvd finetune` continues from the compressed folder.
    assert main(["finetune", str(out), "--data", str(text), "--out", str(tmp_path / "more"), "--tokens", "256", "--max-length", "16",
                 "--teacher", str(folder), "--quiet"]) == 0  # --teacher alone turns distillation on
    shown = capsys.readouterr().out
    assert "held-out perplexity" in shown and "s CPU" in shown
    again = json.loads((tmp_path / "more" / "config.json").read_text())["quantization_config"]["finetune"]
    assert again["distill"] and again["previous"][0]["tokens"] == summary["tokens"]


def test_cli_causal_recovery_errors_are_one_line(llama_text, classifier_dir, data, tmp_path, capsys):
    folder, text = llama_text
    base = ["compress", str(folder), "--out", str(tmp_path / "x"), "--method", "svd", "--keep", "0.5", "--quiet"]
    cases = [
        (base + ["--finetune-data", str(text), "--finetune-tokens", "0"], "--finetune-tokens"),
        (base + ["--finetune-data", str(text), "--finetune-tokens", "100", "--finetune-epochs", "1"], "one of them"),
        (base + ["--finetune-distill"], "--finetune-data"),
        (base + ["--finetune-tokens", "100"], "--finetune-data"),
        (base + ["--finetune-data", str(text), "--finetune-lr", "-1"], "--lr"),
        (["compress", str(classifier_dir), "--out", str(tmp_path / "y"), "--method", "svd", "--keep", "0.5", "--quiet",
          "--finetune-data", str(data["sst2"]), "--finetune-tokens", "100"], "causal"),
        (["finetune", str(folder), "--data", str(text), "--out", str(tmp_path / "z"), "--distill", "--quiet"], "--teacher"),
        (["finetune", str(folder), "--data", str(text), "--out", str(tmp_path / "z"), "--teacher", str(folder), "--no-distill", "--quiet"], "--no-distill"),
    ]
    for argv, needle in cases:
        try:
            status = main(argv)
        except SystemExit as exit:  # argparse's own checks (a non-positive count) exit from the parser
            status = exit.code
        assert status == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, (argv, err)
    assert not any((tmp_path / name).exists() for name in ("x", "y", "z"))


def test_causal_blocks_one_at_a_time_give_the_batch_gradient(llama_text, monkeypatch):
    import fwsvd.training.finetune as ft

    folder, text = llama_text
    config = FinetuneConfig(data=str(text), tokens=16 * 4 * 3, lr=3e-3, batch_size=4, max_length=16, distill=True, eval_steps=3)
    states = []
    for micro in (1, 4):
        monkeypatch.setattr(ft, "_MICRO_BATCH", micro)
        loaded, dense = _compressed_llama(folder)
        summary = finetune(loaded, config, progress=False, teacher=dense)
        states.append((summary, {n: p.detach().clone() for n, p in loaded.model.named_parameters()}))
    (one, a), (whole, b) = states
    assert one["history"][-1]["loss"] == pytest.approx(whole["history"][-1]["loss"], rel=1e-5)
    assert one["history"][-1]["kl"] == pytest.approx(whole["history"][-1]["kl"], rel=1e-4, abs=1e-7)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
