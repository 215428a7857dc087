"""The one-step gradient correction of compressed causal LMs (``fwsvd compress --correct``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fwsvd
from fwsvd import data as d
from fwsvd.cli import main
from fwsvd.compression.correction import correction_blocks, gradient_correction
from fwsvd.errors import DataError, ModelError
from fwsvd.training.losses import block_nll, example_losses
from fwsvd.nn import LowRankLinear


@pytest.fixture(scope="module")
def text(bigram_txt) -> Path:
    """conftest's bigram text: 87 blocks of 16 tokens for the tiny Llama."""
    return bigram_txt


def _compressed(folder: Path) -> "fwsvd.LoadedModel":
    loaded = fwsvd.load_model(folder)
    fwsvd.compress(loaded.model, fwsvd.CompressConfig(method="svd", keep=0.4), task="causal-lm", progress=False)
    return loaded


def _blocks(loaded, text: Path) -> tuple[torch.Tensor, torch.Tensor]:
    every = d.causal_blocks(loaded.tokenizer, d.read_text(text), 16)
    picked = d.draw(len(every), 12, 0)
    return every[torch.tensor(picked)], correction_blocks(every, picked, 0)


def test_the_step_is_the_sign_of_the_mean_gradient_and_lowers_the_heldout_loss(llama_dir, text):
    loaded = _compressed(llama_dir)
    model = loaded.model
    blocks, heldout = _blocks(loaded, text)
    factors = {n: p for n, p in model.named_parameters() if n.endswith(("weight_in", "weight_out"))}
    others = {n: p.detach().clone() for n, p in model.named_parameters() if n not in factors}
    before = {n: p.detach().clone() for n, p in factors.items()}
    # The gradient of the mean loss over all blocks in one batch (the correction goes one block at a time).
    model.zero_grad()
    example_losses("causal-lm", model(input_ids=blocks).logits, blocks).mean().backward()
    signs = {n: p.grad.sign() for n, p in factors.items()}
    model.zero_grad(set_to_none=True)
    nll_before = block_nll(model, heldout, 4)

    summary = gradient_correction(model, blocks, heldout, steps=(1e-4, 1e-3, 1e-2, 1e-1), progress=False)

    step = summary["step"]
    assert step > 0, summary["tried"]
    for n, p in factors.items():
        torch.testing.assert_close(p.detach(), before[n] - step * signs[n], rtol=0, atol=1e-6)
        assert p.requires_grad and p.grad is None
    for n, p in model.named_parameters():
        if n in others:
            assert torch.equal(p.detach(), others[n]), n  # only the factors move
    assert block_nll(model, heldout, 4) < nll_before
    assert summary["heldout_perplexity_after"] < summary["heldout_perplexity_before"]
    assert summary["blocks"] == 12 and summary["heldout_blocks"] == len(heldout) == 8
    assert summary["parameters"] == sum(p.numel() for p in factors.values())
    assert not model.training


def test_a_step_that_raises_the_heldout_loss_is_not_taken(llama_dir, text):
    loaded = _compressed(llama_dir)
    blocks, heldout = _blocks(loaded, text)
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    summary = gradient_correction(loaded.model, blocks, heldout, steps=(1e4, 2e4, 4e4), progress=False)
    assert summary["step"] == 0 and [s for s, _ in summary["tried"]] == [2e4, 1e4]  # middle, then down; no larger step
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())
    assert summary["heldout_perplexity_after"] == summary["heldout_perplexity_before"]


def test_heldout_blocks_never_overlap_the_gradient_blocks():
    every = torch.arange(20 * 4).view(20, 4)
    picked = d.draw(20, 15, 3)
    held = correction_blocks(every, picked, 3)
    assert len(held) == 5 and not set(held[:, 0].tolist()) & set(every[picked][:, 0].tolist())
    with pytest.raises(DataError, match="fewer --samples"):
        correction_blocks(every, list(range(20)), 0)


def test_the_correction_needs_a_compressed_model(llama_dir, text):
    loaded = fwsvd.load_model(llama_dir)
    blocks = d.causal_blocks(loaded.tokenizer, d.read_text(text), 16, limit=4)
    with pytest.raises(ModelError, match="compress it first"):
        gradient_correction(loaded.model, blocks[:2], blocks[2:], progress=False)


def test_cli_compress_with_correct_records_the_step_and_reloads(llama_dir, text, tmp_path, capsys):
    out = tmp_path / "corrected"
    assert main(["compress", str(llama_dir), "--out", str(out), "--method", "fwsvd", "--keep", "0.5", "--data", str(text),
                 "--samples", "12", "--max-length", "16", "--correct", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    corr = result["correction"]
    assert corr["blocks"] == 12 and corr["heldout_blocks"] == 8 and corr["data"] == str(text)
    assert corr["heldout_perplexity_after"] <= corr["heldout_perplexity_before"]
    record = json.loads((out / "config.json").read_text())["quantization_config"]
    assert record["correction"]["step"] == corr["step"]
    assert main(["inspect", str(out)]) == 0
    assert f"one gradient step of {corr['step']:g}" in capsys.readouterr().out
    back = fwsvd.load(out)
    assert {n: m.rank for n, m in back.named_modules() if isinstance(m, LowRankLinear)} == {k: int(v) for k, v in record["ranks"].items()}
    # The same held-out perplexity from the saved folder: the step was saved with the factors.
    every = d.causal_blocks(fwsvd.load_model(out).tokenizer, d.read_text(text), 16)
    held = correction_blocks(every, d.draw(len(every), 12, 0), 0)
    assert torch.exp(torch.tensor(block_nll(back, held, 4))).item() == pytest.approx(corr["heldout_perplexity_after"], rel=1e-4)


def test_cli_correct_errors_are_one_line(llama_dir, bert_dir, sst2_tsv, text, tmp_path, capsys):
    base = ["compress", str(llama_dir), "--out", str(tmp_path / "x"), "--method", "svd", "--keep", "0.5", "--quiet", "--correct"]
    cases = [
        (base, "--data"),
        (base + ["--data", str(text), "--low-memory"], "--low-memory"),
        (base + ["--data", str(text), "--samples", "87", "--max-length", "16"], "fewer --samples"),
        (["compress", str(bert_dir), "--out", str(tmp_path / "y"), "--method", "svd", "--keep", "0.5", "--quiet", "--correct",
          "--data", str(sst2_tsv)], "causal"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, (argv, err)
    assert not any((tmp_path / name).exists() for name in ("x", "y"))


def test_the_line_search_walks_the_grid_to_a_local_minimum(llama_dir, text):
    loaded = _compressed(llama_dir)
    blocks, heldout = _blocks(loaded, text)
    grid = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    summary = gradient_correction(loaded.model, blocks, heldout, steps=grid, progress=False)
    tried = dict(summary["tried"])
    assert grid[len(grid) // 2] in tried  # it starts in the middle
    best = summary["step"]
    assert best > 0 and tried[best] == min(tried.values()) == summary["heldout_perplexity_after"]
    at = grid.index(best)
    # The best step's neighbours on the grid were tried and are worse: a local minimum.
    for neighbour in grid[max(at - 1, 0) : at + 2]:
        if neighbour != best:
            assert neighbour in tried and tried[neighbour] > tried[best]


def test_cli_correct_with_stats_and_dtype_steps_in_float32_then_stores_bfloat16(llama_dir, text, tmp_path, capsys):
    from safetensors import safe_open

    stats = tmp_path / "s.safetensors"
    base = ["compress", str(llama_dir), "--method", "fwsvd", "--keep", "0.5", "--max-length", "16", "--quiet", "--json"]
    assert main([*base, "--out", str(tmp_path / "a"), "--data", str(text), "--samples", "12", "--save-stats", str(stats)]) == 0
    capsys.readouterr()
    # --stats with --correct: --data and --samples name the correction's text (refused without --correct).
    assert main([*base, "--out", str(tmp_path / "b"), "--stats", str(stats), "--data", str(text), "--samples", "12", "--correct",
                 "--dtype", "bfloat16"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["correction"]["blocks"] == 12 and result["stored_dtype"] == "bfloat16"
    record = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert record["correction"]["step"] == result["correction"]["step"] and record["stored_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} == {torch.bfloat16}
    assert main([*base, "--out", str(tmp_path / "c"), "--stats", str(stats), "--data", str(text)]) == 2
    assert "--stats reuses saved statistics" in capsys.readouterr().err


def test_more_rounds_each_start_from_the_last_and_stop_when_none_helps(llama_dir, text):
    blocks, heldout = _blocks(_compressed(llama_dir), text)
    grid = (1e-4, 1e-3, 1e-2, 1e-1)
    first = gradient_correction(_compressed(llama_dir).model, blocks, heldout, steps=grid, progress=False)
    three = _compressed(llama_dir)
    summary = gradient_correction(three.model, blocks, heldout, steps=grid, rounds=3, progress=False)
    rounds = summary["rounds"]
    assert summary["step"] == first["step"] == rounds[0]["step"] > 0 and summary["tried"] == first["tried"]
    assert 2 <= len(rounds) <= 3 and all(r["step"] > 0 for r in rounds[:-1])
    # Each round taken lowers the held-out loss below the round before (a round finding no step ends them).
    held = [summary["heldout_perplexity_before"]] + [r["heldout_perplexity"] for r in rounds if r["step"]]
    assert all(b < a for a, b in zip(held, held[1:])) and summary["heldout_perplexity_after"] == held[-1]
    # The second round's gradient is taken where the first left the factors: two rounds with the
    # steps two separate one-step corrections took give the same factors.
    two = _compressed(llama_dir)
    both = gradient_correction(two.model, blocks, heldout, steps=grid, rounds=2, progress=False)
    assert [r["step"] for r in both["rounds"]] == [r["step"] for r in rounds[:2]]
    s1, s2 = (r["step"] for r in both["rounds"])
    manual = _compressed(llama_dir)
    for step in (s1, s2):
        assert gradient_correction(manual.model, blocks, heldout, steps=(step,), progress=False)["step"] == step
    for (n, p), q in zip(two.model.named_parameters(), manual.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="at least 1"):
        gradient_correction(three.model, blocks, heldout, rounds=0, progress=False)


def test_cli_correct_steps(llama_dir, text, tmp_path, capsys):
    base = ["compress", str(llama_dir), "--method", "svd", "--keep", "0.4", "--data", str(text), "--samples", "12",
            "--max-length", "16", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "x"), "--correct-steps", "2"]) == 2
    assert "add --correct" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "x"), "--correct", "--correct-steps", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    out = tmp_path / "y"
    assert main([*base, "--out", str(out), "--correct", "--correct-steps", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    corr = result["correction"]
    assert "correction" in result["memory"]["stages"]  # timed and measured as its own stage
    assert 1 <= len(corr["rounds"]) <= 3 and corr["rounds"][0]["step"] == corr["step"]
    record = json.loads((out / "config.json").read_text())["quantization_config"]
    assert record["correction"]["rounds"] == corr["rounds"]
    assert main(["inspect", str(out)]) == 0
    taken = [r["step"] for r in corr["rounds"] if r["step"]]
    shown = capsys.readouterr().out
    assert (f"{len(taken)} gradient steps" if len(taken) > 1 else "one gradient step") in shown
