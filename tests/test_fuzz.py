"""Property-based tests (Hypothesis) of what fwsvd reads from files anyone may have written.

The data readers, the statistics-file reader and the compression-record parser get random bytes,
random JSON and random table shapes; each must return a result or raise an :class:`FwsvdError`
subclass (which the command line prints as one line), never anything else. Example counts are
modest so the suite stays fast on 2 cores; ``deadline=None`` because a loaded CI machine can stall
any single example.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fwsvd import data as d
from fwsvd.errors import FwsvdError
from fwsvd.storage.record import RECORD_KEYS, FwsvdQuantizationConfig, validate_record

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

SUFFIXES = [".tsv", ".csv", ".jsonl", ".json", ".txt"]
COLUMN_NAMES = ["sentence", "label", "text", "question", "sentence1", "sentence2", "score", "gold_label", "tokens", "ner_tags", "idx", "x"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def _read(path: Path) -> object:
    """Every reader that accepts this kind of file; a result or an FwsvdError, nothing else."""
    results = []
    readers = [d.read_text] if path.suffix == ".txt" else [d.read_labelled, d.read_token_labelled]
    for reader in readers:
        try:
            results.append(reader(path))
        except FwsvdError:
            results.append(None)
    return results


def _write(data: bytes, suffix: str) -> object:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(data)
        return _read(path)


@FUZZ
@given(data=st.binary(max_size=2000), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes_never_raise_anything_but_fwsvd_errors(data, suffix):
    _write(data, suffix)


@FUZZ
@given(text=st.text(max_size=500), suffix=st.sampled_from(SUFFIXES))
def test_random_text_never_raises_anything_but_fwsvd_errors(text, suffix):
    _write(text.encode("utf-8", "surrogatepass"), suffix)


cells = st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\t\r\n\x00"), max_size=12) | st.sampled_from(
    ["0", "1", "2", "-", "", "nan", "inf", "1.5", "-3", "positive"]
)


@st.composite
def tables(draw):
    header = draw(st.lists(st.sampled_from(COLUMN_NAMES) | st.text(min_size=1, max_size=6), min_size=1, max_size=5))
    width = len(header)
    rows = draw(st.lists(st.lists(cells, min_size=max(0, width - 1), max_size=width + 1), max_size=12))
    return header, rows


@FUZZ
@given(table=tables(), delimiter=st.sampled_from(["\t", ","]), headerless=st.booleans())
def test_random_tables_give_examples_or_one_error(table, delimiter, headerless):
    header, rows = table
    buffer = io.StringIO()
    if delimiter == "\t":
        lines = ([] if headerless else ["\t".join(header)]) + ["\t".join(row) for row in rows]
        buffer.write("\n".join(lines) + "\n")
    else:
        writer = csv.writer(buffer)
        if not headerless:
            writer.writerow(header)
        writer.writerows(rows)
    result = _write(buffer.getvalue().encode("utf-8"), ".tsv" if delimiter == "\t" else ".csv")
    examples = result[0]
    if examples is not None:
        assert len(examples) >= 1
        assert examples.labels is None or len(examples.labels) == len(examples)


@FUZZ
@given(records=st.lists(st.dictionaries(st.sampled_from(COLUMN_NAMES) | st.text(max_size=6), json_values, max_size=5), max_size=8),
       as_list=st.booleans())
def test_random_jsonl_gives_examples_or_one_error(records, as_list):
    text = json.dumps(records) if as_list else "\n".join(json.dumps(r) for r in records)
    _write(text.encode("utf-8"), ".jsonl")


@FUZZ
@given(labels=st.lists(json_values, max_size=12), num_labels=st.none() | st.integers(-1, 5), regression=st.none() | st.booleans())
def test_label_mapping_gives_targets_or_one_error(labels, num_labels, regression):
    try:
        targets, _, _ = d.label_mapping(labels, num_labels=num_labels, regression=regression)
    except FwsvdError:
        return
    assert len(targets) == len(labels)
    assert all(isinstance(t, (int, float)) and math.isfinite(t) for t in targets)


# --- the compression record ------------------------------------------------------------------------

record_values = {
    "quant_method": st.just("fwsvd"),
    "method": st.sampled_from(["svd", "fwsvd", "asvd", "svd-llm"]),
    "ranks": st.dictionaries(st.text(min_size=1, max_size=30), st.integers(1, 64), max_size=4),
    "library_version": st.just("0.1.0"),
    "method_options": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    "keep": st.floats(0.01, 1.0),
    "include": st.lists(st.text(max_size=8), max_size=3),
    "exclude": st.lists(st.text(max_size=8), max_size=3),
    "dense_layers": st.lists(st.text(max_size=8), max_size=3),
    "parameters": st.integers(1, 10**9),
    "dense_parameters": st.integers(1, 10**9),
    "target_parameters": st.integers(0, 10**9),
    "target_dense_parameters": st.integers(0, 10**9),
    "target_keep": st.floats(0.01, 1.0),
    "calibration": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    "finetune": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
}
# Keys this test has no valid-value strategy for still get random JSON below.


@st.composite
def records(draw):
    """A valid record with some fields replaced by random JSON and some random keys added."""
    keys = draw(st.lists(st.sampled_from(sorted(RECORD_KEYS)), unique=True, max_size=len(RECORD_KEYS)))
    record = {key: draw(record_values.get(key, json_values)) for key in keys}
    for key in draw(st.lists(st.sampled_from(sorted(RECORD_KEYS)), max_size=3)):
        record[key] = draw(json_values)
    record.update(draw(st.dictionaries(st.sampled_from(["__class__", "__dict__", "to_dict", "x", "quant_method"]), json_values, max_size=2)))
    return record


def _parse(record: object) -> dict | None:
    try:
        return validate_record(record)
    except FwsvdError:
        return None


@FUZZ
@given(record=records())
def test_compression_record_is_accepted_only_when_every_field_is_valid(record):
    clean = _parse(record)
    if clean is None:
        with pytest.raises(FwsvdError):
            FwsvdQuantizationConfig(**record)
        return
    assert set(clean) <= set(RECORD_KEYS)
    assert all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1 for k, v in clean["ranks"].items())
    for key in ("keep", "target_keep"):
        if key in clean:
            assert math.isfinite(clean[key]) and 0 < clean[key] <= 1
    config = FwsvdQuantizationConfig(**record)
    assert config.to_dict()["ranks"] == clean["ranks"]
    assert validate_record(config.to_dict())  # what is saved parses again


@FUZZ
@given(record=json_values)
def test_any_json_as_a_record_is_a_result_or_one_error(record):
    _parse(record)


@FUZZ
@given(record=records())
def test_record_in_config_json_loads_or_fails_with_one_error(record, tmp_path_factory):
    """The record as transformers reads it from config.json (a JSON round trip, so Infinity and NaN too)."""
    from transformers import BertConfig

    from fwsvd.storage.loading import check_record

    config = BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    config.quantization_config = json.loads(json.dumps(record))
    try:
        check_record(config)
    except FwsvdError:
        pass


@settings(max_examples=25, deadline=None, derandomize=True)
@given(data=st.binary(max_size=600), header=st.booleans())
def test_random_statistics_files_are_one_error(data, header):
    """``--stats`` given random bytes, or bytes behind a plausible safetensors header length."""
    from fwsvd.calibration.files import load_statistics

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "stats.safetensors"
        prefix = len(data).to_bytes(8, "little") if header else b""
        path.write_bytes(prefix + data)
        with pytest.raises(FwsvdError):
            load_statistics(path)


# --- a model folder's config.json ------------------------------------------------------------------

small_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 64) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def config_folder(bert_dir, tmp_path_factory):
    return json.loads((bert_dir / "config.json").read_text(encoding="utf-8")), tmp_path_factory.mktemp("configs")


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(changes=st.dictionaries(
    st.sampled_from(["hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size", "model_type",
                     "architectures", "num_labels", "id2label", "label2id", "pad_token_id", "quantization_config", "hidden_act",
                     "max_position_embeddings", "torch_dtype", "problem_type"]),
    small_json, min_size=1, max_size=3,
))
def test_random_config_json_loads_or_fails_with_one_error(config_folder, bert_dir, changes):
    """A model folder whose config.json fields are replaced by random JSON: a model, or one FwsvdError."""
    import shutil

    from fwsvd.storage.loading import load_model

    base, root = config_folder
    with tempfile.TemporaryDirectory(dir=root) as folder:
        folder = Path(folder)
        for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(bert_dir / name, folder / name)
        (folder / "config.json").write_text(json.dumps({**base, **changes}), encoding="utf-8")
        try:
            load_model(folder)
        except FwsvdError:
            pass


# --- stored tensors: any dtype, any non-finite value -----------------------------------------------

STORED_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool]
SPECIALS = [float("nan"), float("inf"), -float("inf")]


@pytest.fixture(scope="module")
def compressed_folders(bert_dir, tmp_path_factory):
    """A small svd-compressed folder with float factors, and one with int8 factors."""
    import fwsvd

    root = tmp_path_factory.mktemp("stored")
    folders = {}
    for name, int8 in (("float", False), ("int8", True)):
        loaded = fwsvd.load_model(bert_dir)
        fwsvd.compress(loaded.model, fwsvd.CompressConfig(method="svd", keep=0.5), progress=False)
        if int8:
            fwsvd.quantize_factors(loaded.model)
        folders[name] = fwsvd.save(loaded.model, root / name, loaded.tokenizer)
    return folders


def _poison(tensor: torch.Tensor, dtype: torch.dtype, specials: list[tuple[int, float]]) -> torch.Tensor:
    out = tensor.clone()
    if out.is_floating_point():
        flat = out.view(-1)
        for index, value in specials:
            flat[index % flat.numel()] = value
    return out.to(dtype)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["float", "int8"]),
    which=st.sampled_from(["weight_in", "weight_out", "weight_in_scale", "LayerNorm.weight", "query.bias", "embeddings"]),
    dtype=st.sampled_from(STORED_DTYPES),
    specials=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(SPECIALS)), max_size=3),
)
def test_stored_tensors_of_any_dtype_and_value_load_finite_or_fail_with_one_error(compressed_folders, kind, which, dtype, specials):
    """A compressed folder whose one tensor is re-stored in a random dtype with random NaN/inf: either
    the model loads and every weight is finite floating point, or the load is one FwsvdError."""
    import shutil

    from safetensors.torch import load_file, save_file

    from fwsvd.storage.loading import load_model

    source = compressed_folders[kind]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder) / "m"
        shutil.copytree(source, folder)
        weights = load_file(folder / "model.safetensors")
        keys = sorted(k for k in weights if k.endswith(which) or which in k)
        if not keys:
            return
        key = keys[0]
        weights[key] = _poison(weights[key], dtype, specials)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        try:
            model = load_model(folder).model
        except FwsvdError:
            return
        for name, p in model.named_parameters():
            assert p.is_floating_point() and bool(torch.isfinite(p).all()), name


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    stat=st.sampled_from(["fisher_out", "fisher_in", "act_abs_mean", "cov"]),
    dtype=st.sampled_from(STORED_DTYPES),
    specials=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(SPECIALS)), max_size=2),
    negate=st.booleans(),
)
def test_statistics_tensors_of_any_dtype_and_value_are_usable_or_one_error(stat, dtype, specials, negate):
    """A statistics file whose one tensor has a random dtype, sign or NaN/inf: either every statistic read
    back is finite floating point (non-negative where it is a sum of squares) or the read is one FwsvdError."""
    from fwsvd.calibration.files import load_statistics
    from fwsvd.calibration.statistics import Statistics

    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(0))
    tensors = {"fisher_out": torch.rand(5), "fisher_in": torch.rand(6), "act_abs_mean": x.abs().mean(0), "cov": x.T @ x}
    value = tensors[stat] * (-1 if negate else 1)
    tensors[stat] = _poison(value, dtype, specials)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "stats.safetensors"
        Statistics({"layer": tensors}, {}, {"kinds": ["fisher", "cov", "act"], "samples": 20}).save(path)
        try:
            loaded = load_statistics(path)
        except FwsvdError:
            return
    for name, t in loaded.tensors["layer"].items():
        assert t.is_floating_point() and bool(torch.isfinite(t).all()), name
        if name != "cov":
            assert bool((t >= 0).all()), name
