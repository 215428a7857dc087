"""Tests for --device: one resolver, CPU runs bit-identical to the default, every device path on each available device."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEVICES
from fwsvd import api
from fwsvd.calibration.batches import calibration_batches
from fwsvd.calibration.statistics import collect_statistics
from fwsvd.calibration.streaming import outside_blocks_on, stream_statistics
from fwsvd.cli import main
from fwsvd.device import StageMemory, memory_report, place, resolve_device
from fwsvd.errors import FwsvdError
from fwsvd.nn import find_blocks, find_targets

SMALL = {"samples": 8, "batch_size": 4, "max_length": 16}


def test_resolve_device_forms():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    assert resolve_device(None) == resolve_device("auto")
    for bad in ("gpu", "cuda:", "cuda:-1", "cuda:x", "mps", 3, ""):
        with pytest.raises(FwsvdError, match="pass auto, cpu, cuda or cuda:N"):
            resolve_device(bad)


def test_cuda_past_the_last_gpu_is_one_line_error():
    with pytest.raises(FwsvdError) as err:
        resolve_device(f"cuda:{torch.cuda.device_count() + 7}")
    assert "\n" not in str(err.value) and "--device" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_gpu_fails_before_any_work(bert_dir, sst2_tsv, tmp_path, capsys):
    with pytest.raises(FwsvdError, match="no GPU here.*--device cpu"):
        api.CalibrationConfig(data=str(sst2_tsv), device="cuda")
    with pytest.raises(FwsvdError, match="no GPU here"):
        api.CalibrationConfig(device="cuda:0")
    for command in (
        ["compress", str(bert_dir), "--keep", "0.5", "--data", str(sst2_tsv), "--out", str(tmp_path / "c")],
        ["eval", str(bert_dir), "--data", str(sst2_tsv)],
        ["finetune", str(bert_dir), "--data", str(sst2_tsv), "--out", str(tmp_path / "f")],
    ):
        assert main([*command, "--device", "cuda", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fwsvd: error: --device cuda") and "\n" not in err
    assert not (tmp_path / "c").exists() and not (tmp_path / "f").exists()


def _compressed(fresh, folder, data, **calibration):
    loaded = fresh(folder)
    config = api.CompressConfig(method="fwsvd", keep=0.5)
    stats = api.calibrate(loaded, api.CalibrationConfig(data=str(data), **SMALL, **calibration), config.needs(loaded.task), progress=False)
    api.compress(loaded.model, config, stats, task=loaded.task, progress=False)
    return stats, {k: v.cpu() for k, v in loaded.model.state_dict().items()}


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_cpu_and_auto_without_gpu_are_bit_identical_to_the_default(family, fresh, model_dirs, sst2_tsv, corpus_txt):
    """device="cpu" (and "auto" where there is no GPU) is the computation of a run that names no device."""
    data = sst2_tsv if family == "bert" else corpus_txt
    stats0, state0 = _compressed(fresh, model_dirs[family], data)
    runs = {"cpu": _compressed(fresh, model_dirs[family], data, device="cpu")}
    if not torch.cuda.is_available():
        runs["auto"] = _compressed(fresh, model_dirs[family], data, device="auto")
    for name, (stats, state) in runs.items():
        assert state.keys() == state0.keys()
        for key, tensor in state0.items():
            assert torch.equal(state[key], tensor), (name, key)
        for module, entry in stats0.tensors.items():
            for key, tensor in entry.items():
                assert torch.equal(stats.tensors[module][key], tensor), (name, module, key)


@pytest.mark.parametrize("device", DEVICES)
def test_calibrate_and_compress_on_each_device(device, fresh, llama_dir, corpus_txt):
    """The model stays on the device, the statistics come back on the CPU, and they match the CPU's."""
    ref_stats, ref_state = _compressed(fresh, llama_dir, corpus_txt, device="cpu")
    loaded = fresh(llama_dir)
    config = api.CompressConfig(method="fwsvd", keep=0.5)
    stats = api.calibrate(loaded, api.CalibrationConfig(data=str(corpus_txt), **SMALL, device=device), config.needs(loaded.task), progress=False)
    assert {p.device.type for p in loaded.model.parameters()} == {device}
    assert {t.device.type for e in stats.tensors.values() for t in e.values()} == {"cpu"}
    for module, entry in ref_stats.tensors.items():
        for key, tensor in entry.items():
            torch.testing.assert_close(stats.tensors[module][key], tensor, rtol=1e-3, atol=1e-6 * float(tensor.abs().max()), msg=f"{module} {key}")
    api.compress(loaded.model, config, stats, task=loaded.task, progress=False)
    assert {p.device.type for p in loaded.model.parameters()} == {device}
    ranks = {n: m.rank for n, m in loaded.model.named_modules() if isinstance(m, api.LowRankLinear)}
    ref = fresh(llama_dir)
    assert ranks and set(ranks) == {k.removesuffix(".weight_in") for k in ref_state if k.endswith(".weight_in")}


@pytest.mark.parametrize("device", DEVICES)
def test_streamed_statistics_on_each_device_equal_the_one_pass(device, fresh, llama_dir, corpus_txt):
    """--low-memory's block stream with the blocks moved to the device one at a time: the one-pass statistics,
    on the CPU, and the model's parameters back where they were."""
    loaded = fresh(llama_dir)
    batches, _ = calibration_batches(loaded, api.CalibrationConfig(data=str(corpus_txt), **SMALL).resolved(loaded.task), labels=True)
    names = [t.name for t in find_targets(loaded.model)]
    kinds = {"fisher", "cov", "act"}
    ref = collect_statistics(loaded.model, names, batches, kinds, task=loaded.task, progress=False)
    before = {n: (p, p.device) for n, p in loaded.model.named_parameters()}
    got = stream_statistics(loaded.model, names, batches, kinds, task=loaded.task, progress=False, device=torch.device(device))
    assert {n: (p, p.device) for n, p in loaded.model.named_parameters()} == before
    for module, entry in ref.tensors.items():
        for key, tensor in entry.items():
            assert got.tensors[module][key].device.type == "cpu"
            torch.testing.assert_close(got.tensors[module][key], tensor, rtol=1e-3, atol=1e-6 * float(tensor.abs().max()) + 1e-12, msg=f"{module} {key}")


def test_outside_blocks_on_moves_nothing_without_a_device_and_restores(fresh, llama_dir):
    model = fresh(llama_dir).model
    blocks = find_blocks(model)
    params = {n: p.data_ptr() for n, p in model.named_parameters()}
    with outside_blocks_on(model, blocks, None):
        assert {n: p.data_ptr() for n, p in model.named_parameters()} == params
    with outside_blocks_on(model, blocks, torch.device(DEVICES[-1])):
        inside = tuple(b + "." for b in blocks)
        assert all(p.device.type == DEVICES[-1] for n, p in model.named_parameters() if not n.startswith(inside))
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params


@pytest.mark.parametrize("device", DEVICES)
def test_cli_compress_eval_finetune_report_device_and_memory(device, bert_dir, sst2_tsv, tmp_path, capsys):
    common = ["--max-length", "16", "--quiet", "--json", "--device", device]
    assert main(["compress", str(bert_dir), "--keep", "0.5", "--data", str(sst2_tsv), "--samples", "8", "--out", str(tmp_path / "c"), *common]) == 0
    compressed = json.loads(capsys.readouterr().out)
    memory = compressed["memory"]
    assert memory["device"].startswith(device)
    assert list(memory["stages"]) == ["load", "calibration", "factorization", "save"]
    for stage in memory["stages"].values():
        assert stage["seconds"] >= 0 and stage["peak_rss_bytes"] > 0 and ("peak_gpu_bytes" in stage) == (device == "cuda")
    assert load_file(str(tmp_path / "c" / "model.safetensors"))  # saved from the CPU, same format
    assert main(["eval", str(tmp_path / "c"), "--data", str(sst2_tsv), *common]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert 0 <= evaluated["accuracy"] <= 1 and evaluated["memory"]["device"].startswith(device)
    assert main(["finetune", str(tmp_path / "c"), "--data", str(sst2_tsv), "--limit", "8", "--out", str(tmp_path / "f"), *common]) == 0
    assert json.loads(capsys.readouterr().out)["memory"]["device"].startswith(device)
    # The same folder evaluated on the CPU scores the same (the model's format does not depend on the device).
    assert main(["eval", str(tmp_path / "c"), "--data", str(sst2_tsv), *common[:-2], "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(evaluated["accuracy"], abs=0.15)


@pytest.mark.parametrize("device", DEVICES)
def test_low_memory_compress_on_each_device(device, llama_dir, corpus_txt, tmp_path, capsys):
    """--low-memory --device D writes the folder --device cpu writes (same ranks, same tensor names and dtypes)."""
    args = ["compress", str(llama_dir), "--keep", "0.6", "--data", str(corpus_txt), "--samples", "6", "--batch-size", "2",
            "--max-length", "16", "--low-memory", "--quiet", "--json"]
    assert main([*args, "--out", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    assert main([*args, "--out", str(tmp_path / "dev"), "--device", device]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert out[1]["memory"]["device"].startswith(device)
    assert [r["rank"] for r in out[0]["layers"]] == [r["rank"] for r in out[1]["layers"]]
    a = {k: v for f in sorted((tmp_path / "cpu").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    b = {k: v for f in sorted((tmp_path / "dev").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    if device == "cpu":
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage_memory_and_place(fresh, llama_dir):
    model = fresh(llama_dir).model
    params = [p.data_ptr() for p in model.parameters()]
    assert place(model, "cpu") == torch.device("cpu")
    assert [p.data_ptr() for p in model.parameters()] == params  # left untouched, not copied
    stages = StageMemory(torch.device("cpu"))
    with stages.stage("work"):
        torch.ones(10).sum()
    record = stages.to_dict()
    assert record["device"] == "cpu" and set(record["stages"]["work"]) == {"seconds", "peak_rss_bytes"}
    assert memory_report(torch.device("cpu"))["peak_rss_bytes"] >= record["stages"]["work"]["peak_rss_bytes"]


def test_meta_parameters_without_accelerate_builds_the_same_skeleton(monkeypatch):
    """The fallback for a machine without accelerate: parameters on the meta device, buffers real, hook removed after."""
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    from fwsvd.compression.lowmem import meta_parameters

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=100)
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate now fails
    register = torch.nn.Module.register_parameter
    with meta_parameters():
        model = LlamaForCausalLM(config)
    assert torch.nn.Module.register_parameter is register
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} == {"cpu"}
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"


def test_no_calibration_stage_without_a_calibration(bert_dir, tmp_path, capsys):
    assert main(["compress", str(bert_dir), "--method", "svd", "--keep", "0.5", "--out", str(tmp_path / "o"), "--quiet", "--json", "--device", "cpu"]) == 0
    assert list(json.loads(capsys.readouterr().out)["memory"]["stages"]) == ["load", "factorization", "save"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", [["--quantize", "int3"], ["--any-size"]])
def test_quantize_and_any_size_on_each_device(device, mode, llama_dir, corpus_txt, tmp_path, capsys):
    """--quantize (int3 packs its grid on the device) and --any-size run on the device and save the CPU run's format."""
    args = ["compress", str(llama_dir), *mode, "--data", str(corpus_txt), "--samples", "4", "--max-length", "16", "--quiet", "--json"]
    assert main([*args, "--out", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    assert main([*args, "--out", str(tmp_path / "dev"), "--device", device]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert out[1]["memory"]["device"].startswith(device) and list(out[1]["memory"]["stages"]) == ["compress"]
    a, b = load_file(str(tmp_path / "cpu" / "model.safetensors")), load_file(str(tmp_path / "dev" / "model.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low_memory", [False, True])
def test_half_precision_calibration_leaves_the_weights_and_stays_close(device, low_memory, fresh, llama_dir, corpus_txt):
    """compute_dtype bfloat16: the passes run on copies, the model's float32 weights are untouched, the statistics
    are float32/float64 on the CPU and near the float32 calibration's (bfloat16 keeps 8 bits: 10 % of the scale)."""
    ref = fresh(llama_dir)
    kinds = {"fisher", "cov", "act"}
    base = {**SMALL, "data": str(corpus_txt), "device": device, "low_memory": low_memory}
    want = api.calibrate(ref, api.CalibrationConfig(**base), kinds, progress=False)
    loaded = fresh(llama_dir)
    before = {n: p.detach().cpu().clone() for n, p in loaded.model.named_parameters()}
    got = api.calibrate(loaded, api.CalibrationConfig(**base, compute_dtype="bfloat16"), kinds, progress=False)
    assert got.summary["compute_dtype"] == "bfloat16" and "compute_dtype" not in want.summary
    for n, p in loaded.model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p.detach().cpu(), before[n]), n
    for module, entry in want.tensors.items():
        for key, tensor in entry.items():
            t = got.tensors[module][key]
            assert t.device.type == "cpu" and t.dtype == tensor.dtype, (module, key)
            assert float((t.double() - tensor.double()).abs().max()) <= 0.1 * float(tensor.double().abs().max()), (module, key)


def test_calibration_dtype_option(llama_dir, corpus_txt, tmp_path, capsys):
    args = ["compress", str(llama_dir), "--keep", "0.6", "--data", str(corpus_txt), "--samples", "4", "--max-length", "16", "--quiet", "--json"]
    assert main([*args, "--low-memory", "--calibration-dtype", "bfloat16", "--out", str(tmp_path / "half")]) == 0
    assert main([*args, "--low-memory", "--out", str(tmp_path / "full")]) == 0
    capsys.readouterr()
    half = {k: v for f in (tmp_path / "half").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    full = {k: v for f in (tmp_path / "full").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    # The factors come from the float32 weights: the folder's format does not change.
    assert {k: v.dtype for k, v in half.items()} == {k: v.dtype for k, v in full.items()}
    record = json.loads((tmp_path / "half" / "config.json").read_text())["quantization_config"]
    assert record["calibration"]["compute_dtype"] == "bfloat16"
    with pytest.raises(FwsvdError, match="--calibration-dtype 'int8' must be one of float32, bfloat16, float16"):
        api.CalibrationConfig(compute_dtype="int8")
    assert main([*args, "--sequential", "--calibration-dtype", "float16", "--out", str(tmp_path / "s")]) == 2
    assert "--calibration-dtype float16 applies to" in capsys.readouterr().err
