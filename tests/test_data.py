"""Tests for fwsvd.data: reading every GLUE layout, CSV/JSON, labels, tokenizing and batching."""

from __future__ import annotations

import json
import logging
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from fwsvd.data import (
    Examples,
    batches,
    causal_blocks,
    encode_examples,
    label_mapping,
    read_labelled,
    read_text,
)
from fwsvd.errors import DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SST2_DEV = SHARED / "data" / "sst2" / "dev.tsv"

WORDS = "the cat sat on a mat dog ran far away is good bad movie it was".split()


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny BERT-like word-level tokenizer built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def write(tmp_path: Path, name: str, lines: list[str] | str) -> Path:
    path = tmp_path / name
    text = lines if isinstance(lines, str) else "\n".join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


# --- GLUE layouts ----------------------------------------------------------------------------


def test_sst2(tmp_path):
    path = write(tmp_path, "train.tsv", ["sentence\tlabel", "a good movie .\t1", "a bad movie .\t0"])
    ex = read_labelled(path)
    assert ex.texts == ["a good movie .", "a bad movie ."]
    assert ex.text_pairs is None
    assert ex.labels == [1, 0]
    assert ex.text_columns == ("sentence",)
    assert ex.label_column == "label"
    assert ex.layout == "single"
    assert ex.source == str(path)
    assert len(ex) == 2


def test_cola_headerless(tmp_path):
    path = write(
        tmp_path,
        "train.tsv",
        [
            "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
            'gj04\t0\t*\tThey drank the pub "dry.',
            "gj04\t1\t\tThe more we study verbs, the crazier they get.",
        ],
    )
    ex = read_labelled(path)
    assert ex.layout == "cola"
    assert ex.text_columns == ("sentence",)
    assert ex.label_column == "label"
    assert ex.labels == [1, 0, 1]
    assert ex.texts[1] == 'They drank the pub "dry.'
    assert len(ex) == 3


def test_cola_with_header_is_single(tmp_path):
    # CoLA's test.tsv has a header and no labels.
    path = write(tmp_path, "test.tsv", ["index\tsentence", "0\tBill whistled past the house."])
    ex = read_labelled(path)
    assert ex.layout == "single"
    assert ex.labels is None
    assert ex.label_column is None


def test_mrpc(tmp_path):
    path = write(
        tmp_path,
        "dev.tsv",
        [
            "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
            "1\t1355540\t1355592\tHe said the foodservice pie business doesn't fit.\tThe foodservice pie business does not fit.",
            "0\t2029631\t2029565\tMagnarelli said Racicot hated the Iraqi regime.\tHis wife said he was \"100 percent behind George Bush\".",
        ],
    )
    ex = read_labelled(path)
    assert ex.layout == "mrpc"
    assert ex.text_columns == ("#1 String", "#2 String")
    assert ex.label_column == "Quality"
    assert ex.labels == [1, 0]
    assert ex.text_pairs[0] == "The foodservice pie business does not fit."
    assert ex.text_pairs[1].endswith('Bush".')


def test_qqp_skips_short_rows(tmp_path, caplog):
    path = write(
        tmp_path,
        "train.tsv",
        [
            "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
            "1\t3\t4\tHow do I learn python?\tWhat is the best way to learn python?\t1",
            "2\t5\t6\tWhy is the sky blue?",  # broken row: fewer fields than the header
            '3\t7\t8\tWhat is "love?\tIs 5 a prime?\t0',
        ],
    )
    with caplog.at_level(logging.WARNING, logger="fwsvd.data"):
        ex = read_labelled(path)
    assert ex.layout == "qqp"
    assert ex.text_columns == ("question1", "question2")
    assert ex.label_column == "is_duplicate"
    assert ex.labels == [1, 0]
    assert ex.texts[1] == 'What is "love?'
    assert "skipped 1 malformed" in caplog.text


def test_qnli_string_labels(tmp_path):
    path = write(
        tmp_path,
        "dev.tsv",
        [
            "index\tquestion\tsentence\tlabel",
            "0\tWhat came into force after the new constitution?\tThe treaty came into force.\tentailment",
            "1\tWhat is the first major city?\tIt is a city.\tnot_entailment",
        ],
    )
    ex = read_labelled(path)
    assert ex.layout == "qnli"
    assert ex.text_columns == ("question", "sentence")
    assert ex.labels == ["entailment", "not_entailment"]
    targets, is_regression, mapping = label_mapping(ex.labels, num_labels=2, source=ex.source)
    assert targets == [0, 1]
    assert not is_regression
    assert mapping == {"entailment": 0, "not_entailment": 1}


@pytest.mark.parametrize("task", ["rte", "wnli"])
def test_rte_wnli(tmp_path, task):
    path = write(
        tmp_path,
        f"{task}.tsv",
        ["index\tsentence1\tsentence2\tlabel", "0\tNo weapons were found.\tWeapons were found.\tnot_entailment"],
    )
    ex = read_labelled(path)
    assert ex.layout == "pair"
    assert ex.text_columns == ("sentence1", "sentence2")
    assert ex.text_pairs == ["Weapons were found."]
    assert ex.labels == ["not_entailment"]


def test_mnli_stray_quote_and_missing_gold(tmp_path, caplog):
    header = (
        "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
        "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
    )
    path = write(
        tmp_path,
        "train.tsv",
        [
            header,
            '0\t1\t1n\tgov\t(\t(\t(\t(\tHe said "hi to me.\tHe spoke.\tentailment\tentailment',
            "1\t2\t2n\tgov\t(\t(\t(\t(\tNobody knows.\tEveryone knows.\tcontradiction\t-",
            "2\t3\t3n\tgov\t(\t(\t(\t(\tIt rained.\tThe ground is wet.\tneutral\tneutral",
        ],
    )
    with caplog.at_level(logging.INFO, logger="fwsvd.data"):
        ex = read_labelled(path)
    assert ex.layout == "mnli"
    assert ex.text_columns == ("sentence1", "sentence2")
    assert ex.label_column == "gold_label"
    # The stray quote does not swallow the following lines.
    assert ex.texts == ['He said "hi to me.', "It rained."]
    assert ex.labels == ["entailment", "neutral"]
    assert "skipped 1 rows without a label" in caplog.text


def test_stsb_float_scores(tmp_path):
    path = write(
        tmp_path,
        "dev.tsv",
        [
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
            "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hard hat is dancing.\tA man is dancing.\t5.000",
            "1\tmain-captions\tMSRvid\t2012test\t0002\tnone\tnone\tA young child is riding a horse.\tA child is riding.\t4.750",
            "2\tmain-captions\tMSRvid\t2012test\t0003\tnone\tnone\tA man is slicing.\tA woman dances.\t0.000",
        ],
    )
    ex = read_labelled(path)
    assert ex.layout == "stsb"
    assert ex.label_column == "score"
    assert ex.labels == [5.0, 4.75, 0.0]
    assert all(isinstance(value, float) for value in ex.labels)
    targets, is_regression, mapping = label_mapping(ex.labels)
    assert is_regression and mapping is None
    assert targets == [5.0, 4.75, 0.0]


# --- other formats ---------------------------------------------------------------------------


def test_csv_quoting_and_case_insensitive_columns(tmp_path):
    path = write(
        tmp_path,
        "reviews.csv",
        ['Review,Label', '"good, really good",pos', '"it said ""bad""",neg'],
    )
    ex = read_labelled(path)
    assert ex.texts == ["good, really good", 'it said "bad"']
    assert ex.labels == ["pos", "neg"]
    assert ex.text_columns == ("Review",)
    assert ex.label_column == "Label"
    assert ex.layout == "single"


def test_jsonl_pairs(tmp_path):
    rows = [
        {"premise": "A cat sat.", "hypothesis": "An animal sat.", "label": 0},
        {"premise": "A dog ran.", "hypothesis": "Nothing moved.", "label": 2},
    ]
    path = write(tmp_path, "nli.jsonl", [json.dumps(row) for row in rows])
    ex = read_labelled(path)
    assert ex.layout == "pair"
    assert ex.text_columns == ("premise", "hypothesis")
    assert ex.texts == ["A cat sat.", "A dog ran."]
    assert ex.text_pairs == ["An animal sat.", "Nothing moved."]
    assert ex.labels == [0, 2]


def test_json_list_with_string_numbers(tmp_path):
    path = write(tmp_path, "data.json", json.dumps([{"text": "a", "y": "1"}, {"text": "b", "y": "0.5"}]))
    ex = read_labelled(path)
    assert ex.labels == [1, 0.5]
    assert ex.label_column == "y"


def test_jsonl_bad_line(tmp_path):
    path = write(tmp_path, "bad.jsonl", ['{"text": "a", "label": 1}', "{not json"])
    with pytest.raises(DataError, match="line 2"):
        read_labelled(path)


def test_limit_keeps_first_rows(tmp_path):
    lines = ["sentence\tlabel"] + [f"s{i}\t{i % 2}" for i in range(10)]
    ex = read_labelled(write(tmp_path, "x.tsv", lines), limit=3)
    assert ex.texts == ["s0", "s1", "s2"]
    assert ex.labels == [0, 1, 0]
    with pytest.raises(DataError, match="limit"):
        read_labelled(write(tmp_path, "y.tsv", lines), limit=0)


def test_explicit_columns_override_detection(tmp_path):
    path = write(
        tmp_path,
        "x.tsv",
        ["sentence1\tsentence2\tlabel\tother", "a b\tc d\t1\tx", "e f\tg h\t0\ty"],
    )
    single = read_labelled(path, text_column="sentence2", label_column="other")
    assert single.text_pairs is None
    assert single.texts == ["c d", "g h"]
    assert single.labels == ["x", "y"]
    assert single.layout == "single"
    pair = read_labelled(path, text_column="SENTENCE2", pair_column="sentence1")
    assert pair.texts == ["c d", "g h"]
    assert pair.text_pairs == ["a b", "e f"]
    assert pair.label_column == "label"
    only_pair = read_labelled(path, pair_column="sentence2")
    assert only_pair.text_columns == ("sentence1", "sentence2")


def test_empty_label_column_means_unlabelled(tmp_path):
    path = write(tmp_path, "x.csv", ["text,label", "a,", "b,"])
    ex = read_labelled(path)
    assert ex.texts == ["a", "b"]
    assert ex.labels is None
    assert ex.label_column is None


# --- errors ----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_labelled(tmp_path / "nope.tsv")
    with pytest.raises(DataError, match="not found"):
        read_labelled(str(tmp_path / "nope.csv"))


def test_empty_file(tmp_path):
    with pytest.raises(DataError, match="empty"):
        read_labelled(write(tmp_path, "empty.tsv", ""))
    with pytest.raises(DataError, match="empty"):
        read_labelled(write(tmp_path, "empty.jsonl", "\n"))
    with pytest.raises(DataError, match="no data rows"):
        read_labelled(write(tmp_path, "header.tsv", ["sentence\tlabel"]))


def test_unknown_column_lists_columns(tmp_path):
    path = write(tmp_path, "x.tsv", ["sentence\tlabel", "a\t1"])
    with pytest.raises(DataError, match=r"'review' not found .*columns: sentence, label"):
        read_labelled(path, text_column="review")
    with pytest.raises(DataError, match="'gold'"):
        read_labelled(path, label_column="gold")


def test_no_text_column(tmp_path):
    path = write(tmp_path, "x.csv", ["foo,bar", "a,1"])
    with pytest.raises(DataError, match=r"no text column .*columns: foo, bar.*--text-column"):
        read_labelled(path)


def test_unsupported_format_and_directory(tmp_path):
    with pytest.raises(DataError, match="unsupported"):
        read_labelled(write(tmp_path, "x.parquet", "PAR1"))
    with pytest.raises(DataError, match="directory"):
        read_labelled(tmp_path)


def test_hub_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="cannot load dataset 'glue:sst2'"):
        read_labelled("glue:sst2")


class _FakeFeature:
    def __init__(self, names=None):
        self.names = names


class _FakeDataset:
    def __init__(self, records, features):
        self._records = records
        self.column_names = list(records[0])
        self.features = features

    def __iter__(self):
        return iter(self._records)


def _fake_datasets(monkeypatch, load):
    module = types.ModuleType("datasets")
    module.load_dataset = load
    monkeypatch.setitem(sys.modules, "datasets", module)
    monkeypatch.setitem(sys.modules, "datasets.exceptions", None)


def test_hub_dataset_loaded(monkeypatch):
    calls = []

    def load(name, config, split):
        calls.append((name, config, split))
        records = [
            {"sentence": "good", "label": 1, "idx": 0},
            {"sentence": "bad", "label": -1, "idx": 1},
            {"sentence": "fine", "label": 0, "idx": 2},
        ]
        return _FakeDataset(records, {"sentence": _FakeFeature(), "label": _FakeFeature(["neg", "pos"])})

    _fake_datasets(monkeypatch, load)
    ex = read_labelled("glue:cola", split="validation")
    assert calls == [("glue", "cola", "validation")]
    assert ex.texts == ["good", "fine"]  # -1 is a ClassLabel's "no label"
    assert ex.labels == [1, 0]
    assert ex.layout == "cola"
    assert ex.source == "glue:cola"


def test_hub_network_error(monkeypatch):
    def load(name, config, split):
        raise ConnectionError("Couldn't reach the hub")

    _fake_datasets(monkeypatch, load)
    with pytest.raises(DataError, match=r"cannot load dataset 'someone/thing'.*check your network"):
        read_labelled("someone/thing")


# --- label_mapping ---------------------------------------------------------------------------


def test_label_mapping_ints():
    assert label_mapping([0, 1, 1], num_labels=2) == ([0, 1, 1], False, None)
    assert label_mapping([0.0, 2.0]) == ([0, 2], False, None)  # integral floats are class ids
    assert label_mapping(["1", "0"]) == ([1, 0], False, None)


def test_label_mapping_label2id():
    label2id = {"negative": 0, "positive": 1}
    assert label_mapping(["positive", "negative"], label2id=label2id, num_labels=2) == ([1, 0], False, label2id)
    targets, _, used = label_mapping(["POSITIVE"], label2id=label2id, num_labels=2)
    assert targets == [1] and used == {"POSITIVE": 1}
    # transformers' default LABEL_i map does not match words: fall back to sorted strings.
    targets, _, used = label_mapping(["pos", "neg"], label2id={"LABEL_0": 0, "LABEL_1": 1}, num_labels=2)
    assert targets == [1, 0] and used == {"neg": 0, "pos": 1}


def test_label_mapping_regression():
    assert label_mapping([1, 2, 3], num_labels=1) == ([1.0, 2.0, 3.0], True, None)
    assert label_mapping([0.5, 1], regression=None)[1] is True
    assert label_mapping([0, 1], regression=True) == ([0.0, 1.0], True, None)
    with pytest.raises(DataError, match="not a finite number"):
        label_mapping([1.0, math.nan], num_labels=1)
    with pytest.raises(DataError, match="not a finite number"):
        label_mapping(["2.5", "inf"])
    with pytest.raises(DataError, match="not a number"):
        label_mapping(["pos"], regression=True)


def test_label_mapping_errors():
    with pytest.raises(DataError, match=r"label 5 in data/train.tsv is outside the model's 2 classes \(0..1\)"):
        label_mapping([0, 5], num_labels=2, source="data/train.tsv")
    with pytest.raises(DataError, match="has no labels"):
        label_mapping([])
    with pytest.raises(DataError, match="has no labels"):
        label_mapping(None)
    with pytest.raises(DataError, match="3 distinct labels"):
        label_mapping(["a", "b", "c"], num_labels=2)
    with pytest.raises(DataError, match="not a class id"):
        label_mapping([0.5, 1.0], num_labels=2)
    with pytest.raises(DataError, match="mix numbers"):
        label_mapping([1, "pos"])
    with pytest.raises(DataError, match="negative"):
        label_mapping([-1, 0])


def test_nan_regression_label_from_file(tmp_path):
    path = write(tmp_path, "sts.tsv", ["sentence1\tsentence2\tscore", "a\tb\t1.5", "c\td\tnan"])
    ex = read_labelled(path)
    with pytest.raises(DataError, match="finite"):
        label_mapping(ex.labels, num_labels=1, source=ex.source)


# --- tokenizing, blocks, batches -------------------------------------------------------------


def test_encode_examples(tokenizer):
    ex = Examples(
        texts=["the cat sat", "a dog"],
        text_pairs=["on a mat", "ran far away"],
        labels=[0, 1],
        text_columns=("a", "b"),
        label_column="label",
        layout="pair",
        source="memory",
    )
    items = encode_examples(tokenizer, ex, max_length=6)
    assert [len(item["input_ids"]) for item in items] == [6, 6]
    assert items[0]["input_ids"][0] == tokenizer.cls_token_id
    assert set(items[0]) == {"input_ids", "attention_mask", "token_type_ids"}
    assert items[1]["token_type_ids"][-1] == 1
    single = Examples(["the cat"], None, None, ("t",), None, "single", "memory")
    (item,) = encode_examples(tokenizer, single, max_length=64)
    assert item["input_ids"] == [2, tokenizer.convert_tokens_to_ids("the"), tokenizer.convert_tokens_to_ids("cat"), 3]
    assert item["attention_mask"] == [1, 1, 1, 1]


def test_causal_blocks(tokenizer):
    text = " ".join(WORDS * 3)  # 48 tokens
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    blocks = causal_blocks(tokenizer, text, 10)
    assert blocks.dtype == torch.long
    assert blocks.shape == (4, 10)
    assert blocks.reshape(-1).tolist() == ids[:40]
    assert causal_blocks(tokenizer, text, 10, limit=2).tolist() == blocks[:2].tolist()
    sampled = causal_blocks(tokenizer, text, 5, samples=3, seed=1)
    all_blocks = causal_blocks(tokenizer, text, 5).tolist()
    assert sampled.shape == (3, 5)
    positions = [all_blocks.index(row) for row in sampled.tolist()]
    assert positions == sorted(positions)
    assert torch.equal(sampled, causal_blocks(tokenizer, text, 5, samples=3, seed=1))
    assert causal_blocks(tokenizer, text, 10, samples=99).shape == (4, 10)
    with pytest.raises(DataError, match="has 48 tokens, fewer than one block of 64"):
        causal_blocks(tokenizer, text, 64)


def test_batches_pad_and_keep_order():
    items = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "token_type_ids": [0, 1, 1]},
        {"input_ids": [8], "attention_mask": [1], "token_type_ids": [0]},
        {"input_ids": [9, 10], "attention_mask": [1, 1], "token_type_ids": [0, 0]},
    ]
    out = list(batches(items, 2, pad_token_id=99, labels=[1, 0, 1]))
    assert len(out) == 2
    first, last = out
    assert first["input_ids"].tolist() == [[5, 6, 7], [8, 99, 99]]
    assert first["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert first["token_type_ids"].tolist() == [[0, 1, 1], [0, 0, 0]]
    assert first["labels"].dtype == torch.long and first["labels"].tolist() == [1, 0]
    assert last["input_ids"].tolist() == [[9, 10]]  # padded to its own longest item
    regression = next(batches(items, 3, pad_token_id=0, labels=[0.5, 1.0, 2.0]))
    assert regression["labels"].dtype == torch.float32
    assert "labels" not in next(batches(items, 3, pad_token_id=0))
    with pytest.raises(DataError, match="labels for 3 examples"):
        list(batches(items, 2, pad_token_id=0, labels=[1]))


# --- plain text ------------------------------------------------------------------------------


def test_read_text(tmp_path):
    assert read_text(write(tmp_path, "a.txt", "hello world\n")) == "hello world\n"
    with pytest.raises(DataError, match="not found"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="empty"):
        read_text(write(tmp_path, "blank.txt", "  \n\n "))


# --- shared data -----------------------------------------------------------------------------


@pytest.mark.skipif(not SST2_DEV.is_file(), reason=f"shared SST-2 data not present at {SST2_DEV}")
def test_shared_sst2_dev():
    ex = read_labelled(SST2_DEV)
    assert len(ex) == 872
    assert ex.layout == "single"
    assert set(ex.labels) == {0, 1}
