"""--dense-choice auto (fwsvd.compression.selection): both allocation rules scored on held-out text, the better kept."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import low_rank_ranks, run_cli

import fwsvd
from fwsvd import api
from fwsvd.compression.selection import heldout_blocks, select_dense_choice
from fwsvd.errors import DataError, FwsvdError
from fwsvd.storage.record import validate_record

CAL = {"samples": 4, "batch_size": 2, "max_length": 16}


def _stats(loaded, corpus_txt):
    config = api.CompressConfig(method="fwsvd", keep=0.5)
    return api.calibrate(loaded, api.CalibrationConfig(data=str(corpus_txt), **CAL), config.needs(loaded.task), progress=False)


def _differing_keep(fresh, llama_dir, stats):
    """A keep at which the two rules give the tiny Llama different ranks (the choice then has to be scored)."""
    for keep in (0.6, 0.5, 0.7, 0.4, 0.8, 0.3):
        ranks = {}
        for rule in ("break-even", "loss"):
            loaded = fresh(llama_dir)
            fwsvd.compress(loaded.model, api.CompressConfig(method="fwsvd", keep=keep, dense_choice=rule), stats, task=loaded.task, progress=False)
            ranks[rule] = low_rank_ranks(loaded.model)
        if ranks["break-even"] != ranks["loss"]:
            return keep
    pytest.fail("the two dense choices agree at every keep tried")


def test_auto_keeps_the_rule_with_the_lower_heldout_loss_and_equals_that_rule(fresh, llama_dir, corpus_txt):
    loaded = fresh(llama_dir)
    stats = _stats(loaded, corpus_txt)
    keep = _differing_keep(fresh, llama_dir, stats)
    heldout = heldout_blocks(loaded.tokenizer, str(corpus_txt), 16, 0, (4,))
    report = fwsvd.compress(loaded.model, api.CompressConfig(method="fwsvd", keep=keep, dense_choice="auto"), stats, task=loaded.task, heldout=heldout, progress=False)
    allocation = report.to_dict() and loaded.model.config.quantization_config.allocation
    scores = allocation["dense_choice_auto"]["heldout_perplexity"]
    assert set(scores) == {"break-even", "loss"} and allocation["dense_choice_auto"]["heldout_blocks"] == len(heldout) == 8
    chosen = min(scores, key=scores.get)
    assert allocation.get("dense_choice") == chosen
    # Each score is the held-out perplexity of the model that rule alone gives, and the result is that model.
    for rule, ppl in scores.items():
        direct = fresh(llama_dir)
        fwsvd.compress(direct.model, api.CompressConfig(method="fwsvd", keep=keep, dense_choice=rule), stats, task=direct.task, progress=False)
        direct.model.eval()
        with torch.no_grad():
            logits = direct.model(input_ids=heldout).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), heldout[:, 1:].reshape(-1))
        assert math.isclose(ppl, math.exp(float(nll)), rel_tol=1e-4)
        if rule == chosen:
            state, mine = direct.model.state_dict(), loaded.model.state_dict()
            assert state.keys() == mine.keys() and all(torch.equal(state[k], mine[k]) for k in state)
    validate_record(loaded.model.config.quantization_config.to_dict())


def test_identical_candidates_are_not_scored(llama_dir, fresh):
    loaded = fresh(llama_dir)
    same = {"break-even": {"a": 3}, "loss": {"a": 3}}

    def never(_):
        raise AssertionError("scored although both rules give the same ranks")

    rule, selection = select_dense_choice(loaded.model, [], same, never, torch.zeros(2, 4, dtype=torch.long))
    assert rule == "break-even" and selection == {"dense_choice": "break-even", "heldout_blocks": 2}


def test_scoring_leaves_the_dense_model_as_it_was(llama_dir, fresh):
    from fwsvd.nn import find_targets, swap_module

    loaded = fresh(llama_dir)
    targets = find_targets(loaded.model)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    loaded.model.train()

    def apply(ranks):  # swaps one layer for another module, as a factorization would
        swap_module(loaded.model, targets[0].name, torch.nn.Linear(targets[0].in_features, targets[0].out_features, bias=False))

    _, selection = select_dense_choice(loaded.model, targets, {"break-even": {"x": 1}, "loss": {"x": 2}}, apply,
                                       torch.randint(0, 100, (3, 8)))
    assert set(selection["heldout_perplexity"]) == {"break-even", "loss"} and loaded.model.training
    after = loaded.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_heldout_blocks_leave_out_every_calibration_draw(llama_dir, fresh, corpus_txt):
    from fwsvd import data as d

    tok = fresh(llama_dir).tokenizer
    every = d.causal_blocks_from_file(tok, corpus_txt, 16)
    blocks = heldout_blocks(tok, str(corpus_txt), 16, 0, (4, 20))
    drawn = {tuple(every[i].tolist()) for k in (4, 20) for i in d.draw(len(every), k, 0)}
    assert len(blocks) == 8 and not any(tuple(b.tolist()) in drawn for b in blocks)
    assert torch.equal(blocks, heldout_blocks(tok, str(corpus_txt), 16, 0, (4, 20)))  # seeded
    with pytest.raises(DataError, match="none is left to score --dense-choice auto"):
        heldout_blocks(tok, str(corpus_txt), 16, 0, (len(every),))


def test_auto_refuses_without_heldout_text_and_off_causal_lms(llama_dir, bert_dir, fresh, corpus_txt, sst2_tsv):
    loaded = fresh(llama_dir)
    stats = _stats(loaded, corpus_txt)
    with pytest.raises(FwsvdError, match="pass heldout= token blocks"):
        fwsvd.compress(loaded.model, api.CompressConfig(method="fwsvd", keep=0.5, dense_choice="auto"), stats, task=loaded.task, progress=False)
    bert = fresh(bert_dir)
    with pytest.raises(FwsvdError, match="has no next-token loss"):
        fwsvd.compress(bert.model, api.CompressConfig(method="fwsvd", keep=0.5, dense_choice="auto"), None, task=bert.task, progress=False)
    with pytest.raises(FwsvdError, match="must be one of break-even, loss, auto"):
        api.CompressConfig(method="fwsvd", keep=0.5, dense_choice="best")


def test_cli_auto_records_its_choice_and_refuses_modes_that_build_no_whole_model(capsys, tmp_path, llama_dir, corpus_txt):
    small = ["--quiet", "--max-length", "16", "--batch-size", "2", "--samples", "4"]
    out = tmp_path / "auto"
    status, _, err = run_cli(capsys, "compress", llama_dir, "--out", out, "--keep", "0.6", "--data", corpus_txt, "--dense-choice", "auto", *small)
    assert status == 0, err
    status, stdout, err = run_cli(capsys, "inspect", out, "--json")
    allocation = json.loads(stdout)["allocation"]
    # 37 blocks in the text, 4 drawn for Fisher and 32 (8 x 4, the default) for the covariance: 5 left over.
    assert allocation["mode"] == "global" and allocation["dense_choice_auto"]["heldout_blocks"] == 5
    scores = allocation["dense_choice_auto"].get("heldout_perplexity")
    if scores:  # the rules differ at this keep: the recorded rule is the better scored
        assert allocation.get("dense_choice", "break-even") == min(scores, key=scores.get)
    status, stdout, _ = run_cli(capsys, "inspect", out)
    assert "chosen on held-out text" in stdout
    # The human report says which rule was kept and by what, and over how many blocks the covariance was taken.
    status, stdout, err = run_cli(capsys, "compress", llama_dir, "--out", tmp_path / "shown", "--keep", "0.6", "--data", corpus_txt,
                               "--max-length", "16", "--batch-size", "2", "--samples", "4")
    assert status == 0, err
    assert "dense choice " in stdout and "(5 blocks)" in stdout or "both rules gave the same ranks" in stdout
    assert "covariance on 32" in stdout
    # --stats with --data: the text gives the held-out blocks only.
    stats = tmp_path / "s.safetensors"
    assert run_cli(capsys, "compress", llama_dir, "--out", tmp_path / "first", "--keep", "0.6", "--data", corpus_txt, "--save-stats", stats, *small)[0] == 0
    status, _, err = run_cli(capsys, "compress", llama_dir, "--out", tmp_path / "again", "--keep", "0.6", "--stats", stats, "--data", corpus_txt,
                          "--dense-choice", "auto", "--quiet")
    assert status == 0, err
    again = json.loads(run_cli(capsys, "inspect", tmp_path / "again", "--json")[1])
    assert again["ranks"] == json.loads(run_cli(capsys, "inspect", out, "--json")[1])["ranks"]
    status, _, err = run_cli(capsys, "compress", llama_dir, "--out", tmp_path / "nodata", "--keep", "0.6", "--stats", stats, "--dense-choice", "auto", "--quiet")
    assert status == 2 and "pass --data" in err and not (tmp_path / "nodata").exists()
    for mode in (["--keep", "0.6", "--low-memory"], ["--keep", "0.6", "--sequential"], ["--any-size"]):
        status, _, err = run_cli(capsys, "compress", llama_dir, "--out", tmp_path / "m", "--data", corpus_txt, "--dense-choice", "auto", *mode, *small)
        assert status == 2 and "--dense-choice break-even or loss" in err and len(err.strip().splitlines()) == 1, (mode, err)
        assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("bad", [
    {"heldout_blocks": 0},
    {"heldout_blocks": 8, "heldout_perplexity": {"sideways": 3.0}},
    {"heldout_blocks": 8, "heldout_perplexity": {"loss": -1.0}},
    {"heldout_blocks": 8, "extra": 1},
    "loss",
])
def test_a_bad_dense_choice_auto_record_is_refused(llama_dir, fresh, corpus_txt, bad):
    from fwsvd.errors import ModelError

    loaded = fresh(llama_dir)
    fwsvd.compress(loaded.model, api.CompressConfig(method="fwsvd", keep=0.5, dense_choice="auto"), _stats(loaded, corpus_txt), task=loaded.task,
                   heldout=heldout_blocks(loaded.tokenizer, str(corpus_txt), 16, 0, (4,)), progress=False)
    record = loaded.model.config.quantization_config.to_dict()
    validate_record(record)
    record["allocation"]["dense_choice_auto"] = bad
    with pytest.raises(ModelError, match="allocation dense_choice_auto"):
        validate_record(record)
