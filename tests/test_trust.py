"""Trust: no code runs from a model folder, no silent random weights, no data lost, no tracebacks.

One test (or parametrized case) per defect found by probing the command line as a new user and
as an attacker would (issue 8). Every refusal is one line on stderr starting ``fwsvd: error:``,
exit status 2, and leaves the files on disk as they were.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import folder_digest, make_bert, save_model
from safetensors.torch import load_file, save_file

import fwsvd
from fwsvd.cli import main
from fwsvd.errors import FwsvdError, ModelError
from fwsvd.nn import LowRankLinear
from fwsvd.calibration.statistics import Statistics

SMALL = ["--quiet", "--max-length", "16", "--batch-size", "8"]
SRC = str(Path(fwsvd.__file__).resolve().parents[1])


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed (progress bars of save_pretrained)
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own exits
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_refused(status: int, out: str, err: str, *needles: str) -> str:
    """Exit 2, nothing on stdout, exactly one ``fwsvd: error:`` line naming ``needles``."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, (status, lines)
    assert out == ""
    assert len(lines) == 1, lines
    assert lines[0].startswith("fwsvd: error:"), lines[0]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


def siblings(folder: Path) -> list[str]:
    """Hidden leftovers (temporary, backup, probe folders) beside ``folder``."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith("."))


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}


# --- folders ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory, bert_dir) -> Path:
    loaded = fwsvd.load_model(bert_dir)
    fwsvd.compress(loaded.model, fwsvd.CompressConfig(method="svd", keep=0.5), progress=False)
    return fwsvd.save(loaded.model, tmp_path_factory.mktemp("compressed") / "bert-svd", loaded.tokenizer)


def variant(source: Path, dest: Path, *, record=None, drop_record: bool = False, tensors=None) -> Path:
    """A copy of ``source`` with its compression record or weights edited."""
    shutil.copytree(source, dest)
    if record is not None or drop_record:
        config = json.loads((dest / "config.json").read_text(encoding="utf-8"))
        if drop_record:
            config.pop("quantization_config")
        else:
            record(config["quantization_config"])
        (dest / "config.json").write_text(json.dumps(config), encoding="utf-8")
    if tensors is not None:
        weights = load_file(dest / "model.safetensors")
        tensors(weights)
        save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def evil_folder(root: Path, marker: Path, *, model_type: str = "evil", where: str = "config.json") -> Path:
    """A model folder whose config names custom code that, when imported, writes ``marker``."""
    folder = save_model(make_bert(), root / f"evil-{model_type}-{where.split('.')[0]}")
    (folder / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('custom code ran')\n"
        "from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast\n"
        "class EvilConfig(BertConfig):\n    model_type = 'evil'\n"
        "class EvilModel(BertForSequenceClassification):\n    config_class = EvilConfig\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n",
        encoding="utf-8",
    )
    file = folder / where
    data = json.loads(file.read_text(encoding="utf-8"))
    if where == "config.json":
        data["model_type"] = model_type
        data["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"}
    else:
        data["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    file.write_text(json.dumps(data), encoding="utf-8")
    return folder


# --- security: no code from the folder ------------------------------------------------------------


@pytest.mark.parametrize(("model_type", "where"), [("evil", "config.json"), ("bert", "config.json"), ("bert", "tokenizer_config.json")])
@pytest.mark.parametrize("command", ["inspect", "eval"])
def test_custom_code_folder_is_refused_without_running_or_prompting(capsys, monkeypatch, tmp_path, sst2_tsv, model_type, where, command):
    marker = tmp_path / "marker"
    folder = evil_folder(tmp_path, marker, model_type=model_type, where=where)
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "y")
    extra = ["--data", sst2_tsv] if command == "eval" else []
    status, out, err = run(capsys, command, folder, *extra, "--json", "--quiet")
    assert_refused(status, out, err, "custom code", "auto_map")
    assert not marker.exists() and not asked


def test_custom_code_refused_in_a_real_process_with_yes_on_stdin(tmp_path):
    marker = tmp_path / "marker"
    folder = evil_folder(tmp_path, marker)
    proc = subprocess.run(
        [sys.executable, "-m", "fwsvd.cli", "inspect", str(folder), "--json"],
        input="y\ny\n", capture_output=True, text=True, timeout=300, env=subprocess_env(),
    )
    assert proc.returncode == 2
    assert proc.stdout == ""  # no prompt, and --json output stays clean
    assert "Traceback" not in proc.stderr and "[y/N]" not in proc.stderr
    assert not marker.exists()


def test_every_transformers_load_passes_trust_remote_code_false(monkeypatch, bert_dir, sst2_tsv):
    import transformers

    calls: list[tuple[str, dict]] = []
    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForSequenceClassification"):
        cls = getattr(transformers, name)
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, kwargs))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    fwsvd.load_model(bert_dir, need_tokenizer=True)
    from fwsvd.training.finetune import FinetuneConfig, load_for_finetune

    encoder = bert_dir.parent / "encoder-for-trust"
    if not encoder.exists():
        save_model(make_bert().bert, encoder)
    load_for_finetune(encoder, FinetuneConfig(data=str(sst2_tsv)))
    assert {name for name, _ in calls} == {"AutoConfig", "AutoTokenizer", "AutoModelForSequenceClassification"}
    assert all(kwargs.get("trust_remote_code") is False for _, kwargs in calls), calls


# --- security: pickles ----------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pickle code ran"))


@pytest.fixture(scope="module")
def pickle_dirs(tmp_path_factory, bert_dir):
    root = tmp_path_factory.mktemp("pickles")
    clean = root / "clean-bin"
    clean.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bert_dir / name, clean / name)
    torch.save(load_file(bert_dir / "model.safetensors"), clean / "pytorch_model.bin")
    evil = root / "evil-bin"
    shutil.copytree(clean, evil)
    marker = root / "marker"
    torch.save({"weights": _Evil(str(marker))}, evil / "pytorch_model.bin")
    return {"clean": clean, "evil": evil, "marker": marker}


@pytest.mark.parametrize("which", ["clean", "evil"])
def test_pickle_weights_are_refused_without_the_flag(capsys, pickle_dirs, which):
    status, out, err = run(capsys, "inspect", pickle_dirs[which], "--quiet")
    assert_refused(status, out, err, "pickle", "--allow-pickle")
    assert not pickle_dirs["marker"].exists()


def test_malicious_pickle_with_the_flag_is_one_line_and_never_executed(capsys, pickle_dirs):
    status, out, err = run(capsys, "inspect", pickle_dirs["evil"], "--allow-pickle", "--quiet")
    assert_refused(status, out, err, "weights", "safetensors")
    # torch's own advice (rerun with weights_only=False) is the unsafe action: never repeated.
    assert "weights_only" not in err and "trust the source" not in err, err
    assert not pickle_dirs["marker"].exists()


def test_clean_pickle_loads_with_the_flag(capsys, pickle_dirs):
    status, out, err = run(capsys, "inspect", pickle_dirs["clean"], "--allow-pickle", "--json", "--quiet")
    assert status == 0, err
    assert json.loads(out)["compressed"] is False


# --- silent wrong results: incomplete loads ---------------------------------------------------------


def _drop_classifier(weights):
    weights.pop("classifier.weight")


def _add_tensor(weights):
    weights["extra.weight"] = torch.zeros(3)


def _drop_factor(weights):
    weights.pop(next(k for k in weights if k.endswith(".weight_in")))


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("record-deleted", ["no fwsvd compression record"]),
        ("ranks-empty", ["no fwsvd compression record"]),
        ("classifier-missing", ["lack", "classifier.weight"]),
        ("unused-tensor", ["extra.weight", "does not use"]),
        ("factor-missing", ["lack", "weight_in"]),
        ("rank-mismatch", ["rank 4", "shape [8, 32]"]),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "eval"])
def test_incomplete_or_inconsistent_folder_is_refused(capsys, tmp_path, compressed_dir, sst2_tsv, case, needles, command):
    key = "bert.encoder.layer.0.attention.self.key"
    edits = {
        "record-deleted": {"drop_record": True},
        "ranks-empty": {"record": lambda r: r.update(ranks={})},
        "classifier-missing": {"tensors": _drop_classifier},
        "unused-tensor": {"tensors": _add_tensor},
        "factor-missing": {"tensors": _drop_factor},
        "rank-mismatch": {"record": lambda r: r["ranks"].update({key: 4})},
    }
    folder = variant(compressed_dir, tmp_path / case, **edits[case])
    before = folder_digest(folder)
    extra = ["--data", sst2_tsv, *SMALL] if command == "eval" else ["--quiet"]
    status, out, err = run(capsys, command, folder, *extra, "--json")
    line = assert_refused(status, out, err, *needles)
    assert "look at the above report" not in line
    assert folder_digest(folder) == before


def test_dense_folder_missing_a_tensor_is_refused(capsys, tmp_path, bert_dir):
    folder = variant(bert_dir, tmp_path / "dense", tensors=_drop_classifier)
    assert_refused(*run(capsys, "inspect", folder, "--quiet"), "classifier.weight")
    with pytest.raises(ModelError, match="classifier.weight"):
        fwsvd.load(folder)


# --- tracebacks: the compression record, field by field --------------------------------------------

BAD_RECORDS = {
    "ranks-string": (lambda r: r.update(ranks="abc"), "ranks"),
    "ranks-list": (lambda r: r.update(ranks=[8, 8]), "ranks"),
    "rank-infinity": (lambda r: r["ranks"].update({next(iter(r["ranks"])): float("inf")}), "positive integer"),
    "rank-string": (lambda r: r["ranks"].update({next(iter(r["ranks"])): "8"}), "positive integer"),
    "rank-zero": (lambda r: r["ranks"].update({next(iter(r["ranks"])): 0}), "positive integer"),
    "rank-float": (lambda r: r["ranks"].update({next(iter(r["ranks"])): 8.5}), "positive integer"),
    "dense-parameters-0": (lambda r: r.update(dense_parameters=0), "dense_parameters"),
    "dense-parameters-abc": (lambda r: r.update(dense_parameters="abc"), "dense_parameters"),
    "target-keep-abc": (lambda r: r.update(target_keep="abc"), "target_keep"),
    "target-keep-infinity": (lambda r: r.update(target_keep=float("inf")), "target_keep"),
    "keep-2": (lambda r: r.update(keep=2), "keep"),
    "class-key": (lambda r: r.update(__class__="builtins.dict"), "__class__"),
    "dict-key": (lambda r: r.update(__dict__={}), "__dict__"),
    "unknown-key": (lambda r: r.update(surprise=1), "surprise"),
    "include-not-list": (lambda r: r.update(include="*"), "include"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_compression_record_is_one_line(capsys, tmp_path, compressed_dir, case):
    edit, needle = BAD_RECORDS[case]
    folder = variant(compressed_dir, tmp_path / case, record=edit)
    assert_refused(*run(capsys, "inspect", folder, "--json", "--quiet"), "quantization_config", needle)


def test_record_is_validated_on_the_plain_transformers_path_too(tmp_path, compressed_dir):
    from transformers import AutoModelForSequenceClassification

    for case in ("class-key", "ranks-string", "rank-infinity"):
        folder = variant(compressed_dir, tmp_path / case, record=BAD_RECORDS[case][0])
        with pytest.raises(ModelError, match="quantization_config"):
            AutoModelForSequenceClassification.from_pretrained(folder)
    # A rank above what the layer allows is refused before any layer is built.
    key = "bert.encoder.layer.0.attention.self.key"
    folder = variant(compressed_dir, tmp_path / "rank-99", record=lambda r: r["ranks"].update({key: 99}))
    with pytest.raises(ModelError, match=r"rank of .* is 99, above min\(32, 32\)"):
        AutoModelForSequenceClassification.from_pretrained(folder)


def test_quantization_config_that_is_not_an_object_is_one_line(capsys, tmp_path, bert_dir):
    folder = tmp_path / "qc-string"
    shutil.copytree(bert_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = "fwsvd"
    (folder / "config.json").write_text(json.dumps(config))
    status, out, err = run(capsys, "inspect", folder, "--quiet")
    assert status == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1


# --- tracebacks: config errors and weight errors are told apart ------------------------------------


def test_config_error_and_weight_error_say_which(capsys, tmp_path, bert_dir):
    bad_config = tmp_path / "bad-config"
    shutil.copytree(bert_dir, bad_config)
    config = json.loads((bad_config / "config.json").read_text())
    config["hidden_size"] = 33  # not a multiple of the 2 heads: the model cannot be built
    (bad_config / "config.json").write_text(json.dumps(config))
    line = assert_refused(*run(capsys, "inspect", bad_config, "--quiet"), "config.json")
    assert "safetensors" not in line

    bad_weights = tmp_path / "bad-weights"
    shutil.copytree(bert_dir, bad_weights)
    data = (bad_weights / "model.safetensors").read_bytes()
    (bad_weights / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated copy
    line = assert_refused(*run(capsys, "inspect", bad_weights, "--quiet"), "weights", "safetensors")
    assert "config.json" not in line


# --- wasted work: local paths are never sent to the hub --------------------------------------------


@pytest.mark.parametrize("path", ["{tmp}/out/typo", "./no-such-folder/x", "{tmp}/typo", "a/b/c", "out/typo"])
def test_missing_local_looking_path_is_a_missing_folder(capsys, monkeypatch, tmp_path, path):
    import transformers

    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("sent to the hub"))
    assert_refused(*run(capsys, "eval", path.format(tmp=tmp_path), "--data", "x.tsv", "--quiet"), "does not exist")


# --- tracebacks: statistics files ------------------------------------------------------------------


@pytest.fixture(scope="module")
def stats_files(tmp_path_factory, bert_dir, sst2_tsv):
    root = tmp_path_factory.mktemp("stats")
    loaded = fwsvd.load_model(bert_dir)
    good = fwsvd.calibrate(loaded, fwsvd.CalibrationConfig(data=str(sst2_tsv), samples=8, batch_size=8, max_length=16), {"cov"}, progress=False)
    good.save(root / "good.safetensors")
    other = Statistics({n: {k: torch.eye(16, dtype=t.dtype) for k, t in s.items()} for n, s in good.tensors.items()}, good.shared, good.summary)
    other.save(root / "other-model.safetensors")
    (root / "table.tsv").write_text("sentence\tlabel\ngood\t1\n", encoding="utf-8")
    (root / "random.bin").write_bytes(os.urandom(4096))
    save_file({"x::cov": torch.eye(4)}, root / "no-meta.safetensors", metadata={"format": "fwsvd-statistics/1"})
    save_file({"x::cov": torch.eye(4)}, root / "bad-json.safetensors", metadata={"format": "fwsvd-statistics/1", "shared": "{", "summary": "{}"})
    save_file({"x::cov": torch.eye(4)}, root / "plain.safetensors")
    return root


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("table.tsv", "not an fwsvd statistics file"),
        ("random.bin", "not an fwsvd statistics file"),
        ("plain.safetensors", "not an fwsvd statistics file"),
        ("no-meta.safetensors", "'shared' metadata"),
        ("bad-json.safetensors", "'shared' metadata"),
        ("other-model.safetensors", "do not fit this model"),
    ],
)
def test_bad_statistics_file_is_one_line(capsys, tmp_path, bert_dir, stats_files, name, needle):
    out = tmp_path / "out"
    status, stdout, err = run(capsys, "compress", bert_dir, "--out", out, "--method", "svd-llm", "--keep", "0.5", "--stats", stats_files / name, *SMALL)
    assert_refused(status, stdout, err, needle)
    assert not out.exists() and siblings(out) == []


def test_good_statistics_file_is_reused(capsys, tmp_path, bert_dir, stats_files):
    status, _, err = run(capsys, "compress", bert_dir, "--out", tmp_path / "out", "--method", "svd-llm", "--keep", "0.5",
                         "--stats", stats_files / "good.safetensors", *SMALL)
    assert status == 0, err


@pytest.mark.parametrize("extra", [["--data", "@sst2"], ["--samples", "8"]])
def test_stats_with_data_or_samples_is_refused(capsys, tmp_path, bert_dir, stats_files, sst2_tsv, extra):
    extra = [str(sst2_tsv) if a == "@sst2" else a for a in extra]
    status, out, err = run(capsys, "compress", bert_dir, "--out", tmp_path / "out", "--method", "svd-llm", "--keep", "0.5",
                           "--stats", stats_files / "good.safetensors", *extra, *SMALL)
    assert_refused(status, out, err, "--stats", "--data/--samples")


# --- misleading messages ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["svd", "fwsvd", "asvd", "svd-llm"])
def test_recompressing_says_already_compressed(capsys, tmp_path, compressed_dir, sst2_tsv, method):
    status, out, err = run(capsys, "compress", compressed_dir, "--out", tmp_path / "again", "--method", method, "--keep", "0.5",
                           "--data", sst2_tsv, *SMALL)
    assert_refused(status, out, err, "already compressed")


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
@pytest.mark.parametrize("command", ["compress", "eval", "finetune"])
def test_batch_size_below_one_is_refused(capsys, tmp_path, bert_dir, sst2_tsv, command, value):
    args = {
        "compress": ["--out", tmp_path / "out", "--keep", "0.5", "--method", "svd"],
        "eval": [],
        "finetune": ["--out", tmp_path / "out"],
    }[command]
    status, out, err = run(capsys, command, bert_dir, "--data", sst2_tsv, *args, "--batch-size", value, "--quiet")
    assert_refused(status, out, err, "--batch-size")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl", ".txt"])
def test_non_utf8_byte_is_reported_on_its_line(capsys, tmp_path, bert_dir, gpt2_dir, suffix):
    good = {".tsv": b"good movie %d\t1\n", ".jsonl": b'{"sentence": "good %d", "label": 1}\n', ".txt": b"good movie %d\n"}[suffix]
    header = b"sentence\tlabel\n" if suffix == ".tsv" else b""
    lines_before = 12 - (1 if header else 0)
    bad = good.replace(b"good", b"caf\xe9")
    # The bad byte sits on line 13, well inside the decoder's first chunk, and the file goes on.
    data = header + b"".join(good % i for i in range(lines_before)) + bad % 0 + b"".join(good % i for i in range(3000))
    path = tmp_path / f"data{suffix}"
    path.write_bytes(data)
    model = gpt2_dir if suffix == ".txt" else bert_dir
    assert_refused(*run(capsys, "eval", model, "--data", path, *SMALL), "line 13", "utf-8")


# --- data loss: --out may not hold what the run reads ----------------------------------------------


def test_out_holding_the_input_model_is_refused(capsys, tmp_path, bert_dir):
    parent = tmp_path / "models"
    model = parent / "sub"
    shutil.copytree(bert_dir, model)
    (parent / "notes.txt").write_text("keep me")
    before = folder_digest(parent)
    status, out, err = run(capsys, "compress", model, "--out", parent, "--overwrite", "--method", "svd", "--keep", "0.5", *SMALL)
    assert_refused(status, out, err, "input model folder")
    assert folder_digest(parent) == before


@pytest.mark.parametrize("exists", [True, False])
def test_save_stats_inside_out_is_refused_before_calibration(capsys, monkeypatch, tmp_path, bert_dir, sst2_tsv, exists):
    out = tmp_path / "out"
    if exists:
        save_model(make_bert(), out)
    before = folder_digest(out) if exists else None
    monkeypatch.setattr("fwsvd.storage.loading.load_model", lambda *a, **k: pytest.fail("work started before the output checks"))
    status, stdout, err = run(capsys, "compress", bert_dir, "--out", out, "--overwrite", "--method", "svd-llm", "--keep", "0.5",
                              "--data", sst2_tsv, "--save-stats", out / "stats.safetensors", *SMALL)
    assert_refused(status, stdout, err, "--save-stats target")
    assert (folder_digest(out) == before) if exists else not out.exists()


def test_stats_or_data_inside_out_is_refused(capsys, tmp_path, bert_dir, stats_files, sst2_tsv):
    out = tmp_path / "out"
    save_model(make_bert(), out)
    shutil.copy(stats_files / "good.safetensors", out / "stats.safetensors")
    shutil.copy(sst2_tsv, out / "train.tsv")
    before = folder_digest(out)
    common = ["--out", out, "--overwrite", "--method", "svd-llm", "--keep", "0.5", *SMALL]
    assert_refused(*run(capsys, "compress", bert_dir, "--stats", out / "stats.safetensors", *common), "statistics file")
    assert_refused(*run(capsys, "compress", bert_dir, "--data", out / "train.tsv", *common), "data file")
    assert_refused(*run(capsys, "finetune", bert_dir, "--data", out / "train.tsv", "--out", out, "--overwrite", "--quiet"), "training data")
    assert folder_digest(out) == before


# --- wasted work: an impossible --out fails before any work ----------------------------------------


def test_impossible_out_fails_before_loading(capsys, monkeypatch, tmp_path, bert_dir, sst2_tsv):
    monkeypatch.setattr("fwsvd.storage.loading.load_model", lambda *a, **k: pytest.fail("work started before the output checks"))
    (tmp_path / "file.txt").write_text("x")
    common = ["--method", "fwsvd", "--keep", "0.5", "--data", sst2_tsv, *SMALL]
    assert_refused(*run(capsys, "compress", bert_dir, "--out", tmp_path / "file.txt" / "out", *common), "is a file")
    assert_refused(*run(capsys, "compress", bert_dir, "--out", tmp_path / "file.txt", *common), "is a file")
    monkeypatch.chdir(tmp_path)
    assert_refused(*run(capsys, "compress", bert_dir, "--out", ".", "--overwrite", *common), "current folder")
    assert_refused(*run(capsys, "compress", bert_dir, "--out", "..", "--overwrite", *common), "current folder")
    assert_refused(*run(capsys, "compress", bert_dir, "--out", "out", "--save-stats", "file.txt/stats.safetensors", *common), "--save-stats")


def test_unwritable_parent_fails_before_loading(capsys, monkeypatch, tmp_path, bert_dir):
    import tempfile

    locked = tmp_path / "locked"
    locked.mkdir()
    real = tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kwargs):  # what a read-only folder does, also for root
        if dir is not None and Path(dir) == locked:
            raise PermissionError(13, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr("fwsvd.storage.atomic.tempfile.mkdtemp", mkdtemp)
    monkeypatch.setattr("fwsvd.storage.loading.load_model", lambda *a, **k: pytest.fail("work started before the output checks"))
    status, out, err = run(capsys, "compress", bert_dir, "--out", locked / "new" / "out", "--method", "svd", "--keep", "0.5", *SMALL)
    assert_refused(status, out, err, "not writable")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_fails_before_loading(capsys, tmp_path, bert_dir):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        status, out, err = run(capsys, "compress", bert_dir, "--out", locked / "out", "--method", "svd", "--keep", "0.5", *SMALL)
        assert_refused(status, out, err, "not writable")
    finally:
        locked.chmod(0o755)


# --- outputs: permissions, stale leftovers, signals, concurrent writers ----------------------------


def test_written_files_follow_the_umask(capsys, tmp_path, bert_dir, sst2_tsv):
    old = os.umask(0o022)
    try:
        status, _, err = run(capsys, "compress", bert_dir, "--out", tmp_path / "out", "--method", "svd-llm", "--keep", "0.5",
                             "--data", sst2_tsv, "--samples", "8", "--save-stats", tmp_path / "stats.safetensors", *SMALL)
    finally:
        os.umask(old)
    assert status == 0, err
    modes = {p.name: p.stat().st_mode & 0o777 for p in [*(tmp_path / "out").iterdir(), tmp_path / "stats.safetensors"]}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_stale_leftovers_of_killed_runs_are_removed(tmp_path, bert_dir):
    loaded = fwsvd.load_model(bert_dir)
    out = fwsvd.save(loaded.model, tmp_path / "out", loaded.tokenizer)
    for name in (".out.k1ll3d.partial", ".out.0ld.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / ".other.abc.partial").mkdir()  # another output's: not ours to remove
    fwsvd.save(loaded.model, out, loaded.tokenizer, overwrite=True)
    assert siblings(out) == [".other.abc.partial"]
    assert fwsvd.load(out) is not None


def test_a_run_killed_between_the_renames_gets_its_old_output_back(tmp_path, bert_dir):
    loaded = fwsvd.load_model(bert_dir)
    out = fwsvd.save(loaded.model, tmp_path / "out", loaded.tokenizer)
    before = folder_digest(out)
    out.rename(tmp_path / ".out.a1b2.old")  # the first rename of a swap happened, the second did not
    (tmp_path / ".out.c3d4.partial").mkdir()
    with pytest.raises(FwsvdError, match="--overwrite"):  # the restored output is not replaced unasked
        fwsvd.save(loaded.model, out, loaded.tokenizer)
    assert folder_digest(out) == before and siblings(out) == []


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import transformers
    from fwsvd.cli import main

    original = transformers.PreTrainedModel.save_pretrained

    def save_then_die(self, folder, *args, **kwargs):
        original(self, folder, *args, **kwargs)
        assert any(Path(folder).iterdir())
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        import time
        time.sleep(30)

    transformers.PreTrainedModel.save_pretrained = save_then_die
    sys.exit(main(["compress", sys.argv[2], "--out", sys.argv[3], "--method", "svd", "--keep", "0.5", "--quiet"]))
    """
)


def test_sigterm_during_the_save_cleans_up_and_sigkill_leftovers_go_next_run(tmp_path, bert_dir):
    script = tmp_path / "kill.py"
    script.write_text(_KILL_SCRIPT)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), "SIGTERM", str(bert_dir), str(out)],
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "Traceback" not in proc.stderr and "terminated" in proc.stderr
    assert not out.exists() and siblings(out) == []

    proc = subprocess.run([sys.executable, str(script), "SIGKILL", str(bert_dir), str(out)],
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == -signal.SIGKILL
    assert [name.endswith(".partial") for name in siblings(out)] == [True]  # what SIGKILL leaves
    loaded = fwsvd.load_model(bert_dir)
    fwsvd.save(loaded.model, out, loaded.tokenizer)
    assert siblings(out) == [] and (out / "model.safetensors").is_file()


def _concurrent_writer(out: str, tag: int, overwrite: bool, queue) -> None:
    import time

    from fwsvd.storage.atomic import atomic_dir

    try:
        for _ in range(3 if overwrite else 1):
            with atomic_dir(out, overwrite=overwrite) as tmp:
                for i in range(5):
                    (tmp / f"part{i}").write_text(str(tag))
                    time.sleep(0.01)
        queue.put((tag, "ok"))
    except FwsvdError as err:
        queue.put((tag, str(err)))
    except BaseException as err:  # noqa: BLE001 - reported to the test
        queue.put((tag, f"{type(err).__name__}: {err}"))


@pytest.mark.parametrize("overwrite", [True, False])
def test_concurrent_writers_end_with_one_complete_output(tmp_path, overwrite):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    out = tmp_path / "out"
    writers = [ctx.Process(target=_concurrent_writer, args=(str(out), tag, overwrite, queue)) for tag in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
    results = dict(queue.get(timeout=10) for _ in writers)
    if overwrite:
        assert set(results.values()) == {"ok"}, results
    else:
        # The first writer wins; the others are told the folder exists.
        assert list(results.values()).count("ok") == 1, results
        assert all("--overwrite" in v for v in results.values() if v != "ok"), results
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [f"part{i}" for i in range(5)]
    assert len({f.read_text() for f in files}) == 1  # all from one writer
    assert siblings(out) == []


# --- library side: fwsvd.load ---------------------------------------------------------------------


def test_load_refuses_what_the_cli_refuses(tmp_path, compressed_dir):
    folder = variant(compressed_dir, tmp_path / "norecord", drop_record=True)
    with pytest.raises(ModelError, match="no fwsvd compression record"):
        fwsvd.load(folder)
    good = fwsvd.load(compressed_dir)
    assert any(isinstance(m, LowRankLinear) for m in good.modules())
