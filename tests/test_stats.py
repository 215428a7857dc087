"""Tests for fwsvd.calibration.statistics: Fisher, activation and covariance statistics collected through hooks."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import save_file

from fwsvd import api
from fwsvd.calibration.batches import calibration_batches
from fwsvd.storage.loading import load_model
from fwsvd.errors import FwsvdError
from fwsvd.nn import find_targets
from fwsvd.calibration.statistics import Statistics, collect_statistics


def batches_for(loaded, data, *, labels=True, samples=16):
    cfg = api.CalibrationConfig(data=str(data), samples=samples, batch_size=8, max_length=16)
    batches, _ = calibration_batches(loaded, cfg, labels=labels)
    return batches


def single_examples(batches):
    """Each example of ``batches`` alone, as a batch of one without its padding (labels kept)."""
    for batch in batches:
        for i in range(len(batch["input_ids"])):
            length = int(batch["attention_mask"][i].sum())
            yield {k: v[i : i + 1, :length] if v.dim() == 2 else v[i : i + 1] for k, v in batch.items()}


def hook_counts(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def bert_fisher(bert_dir, sst2_tsv):
    """Fisher + act + cov statistics of the tiny BERT, with the model and batches they came from."""
    loaded = load_model(bert_dir)
    names = [t.name for t in find_targets(loaded.model)]
    batches = batches_for(loaded, sst2_tsv)
    stats = collect_statistics(loaded.model, names, batches, {"fisher", "act", "cov"}, keep_full_fisher=True, progress=False)
    return loaded, names, batches, stats


def test_fisher_shapes_and_values(bert_fisher):
    loaded, names, _, stats = bert_fisher
    assert set(stats.tensors) == set(names)
    for target in find_targets(loaded.model):
        entry = stats.tensors[target.name]
        fo, fi = entry["fisher_out"], entry["fisher_in"]
        assert fo.shape == (target.out_features,) and fi.shape == (target.in_features,)
        for t in (fo, fi, entry["fisher_full"]):
            assert torch.isfinite(t).all() and (t >= 0).all()
        assert fo.sum() > 0
        # One pass serves both reductions of the same elementwise Fisher (float32 sums: rel 1e-5).
        torch.testing.assert_close(entry["fisher_full"].sum(1), fo, rtol=1e-5, atol=0)
        torch.testing.assert_close(entry["fisher_full"].sum(0), fi, rtol=1e-5, atol=0)
    assert stats.summary["batches"] == 2 and stats.summary["samples"] == 16
    assert stats.summary["kinds"] == ["act", "cov", "fisher"]
    assert stats.summary["mean_loss"] > 0


def test_fisher_equals_squared_gradients(bert_dir, sst2_tsv, fresh):
    """Fisher is the sum over examples of the squared gradient of each example's own loss,
    checked against autograd on each example alone (a batch of one, the model's own loss)."""
    loaded = fresh(bert_dir)
    name = "bert.encoder.layer.1.intermediate.dense"
    batches = batches_for(loaded, sst2_tsv)
    stats = collect_statistics(loaded.model, [name], batches, {"fisher"}, keep_full_fisher=True, progress=False)
    weight = loaded.model.get_submodule(name).weight
    expected = torch.zeros_like(weight)
    loaded.model.eval()
    for one in single_examples(batches):
        (grad,) = torch.autograd.grad(loaded.model(**one).loss, weight)
        expected += grad.square()
    # Same float32 quantities by another route (padded batch vs unpadded example): rel 1e-4.
    torch.testing.assert_close(stats.tensors[name]["fisher_full"], expected, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(stats.tensors[name]["fisher_out"], expected.sum(1), rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(stats.tensors[name]["fisher_in"], expected.sum(0), rtol=1e-4, atol=1e-10)
    assert stats.summary["fisher_granularity"] == "example"


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_fisher_does_not_depend_on_batch_size(family, bert_dir, gpt2_dir, llama_dir, sst2_tsv, corpus_txt, fresh):
    """The same samples at batch sizes 1, 4 and 16 give the same statistics (float32 tolerance)."""
    folder, data = {"bert": (bert_dir, sst2_tsv), "gpt2": (gpt2_dir, corpus_txt), "llama": (llama_dir, corpus_txt)}[family]
    loaded = fresh(folder)
    names = [t.name for t in find_targets(loaded.model)]
    results = []
    for batch_size in (1, 4, 16):
        cfg = api.CalibrationConfig(data=str(data), samples=16, batch_size=batch_size, max_length=16)
        batches, _ = calibration_batches(loaded, cfg)
        results.append(collect_statistics(loaded.model, names, batches, {"fisher", "cov"}, progress=False))
    reference = results[0]
    assert reference.summary["mean_loss"] > 0
    for other in results[1:]:
        for n in names:
            for key in ("fisher_out", "fisher_in", "cov"):
                if key == "cov" and key not in reference.tensors[n]:
                    continue
                torch.testing.assert_close(other.tensors[n][key], reference.tensors[n][key], rtol=1e-4, atol=1e-9, msg=f"{n} {key}")
        assert other.summary["mean_loss"] == pytest.approx(reference.summary["mean_loss"], rel=1e-5)


def test_fisher_gpt2_conv1d_layout(gpt2_dir, corpus_txt, fresh):
    loaded = fresh(gpt2_dir)
    batches = batches_for(loaded, corpus_txt, samples=4)
    stats = collect_statistics(loaded.model, ["transformer.h.0.attn.c_attn"], batches, {"fisher"}, progress=False)
    entry = stats.tensors["transformer.h.0.attn.c_attn"]
    assert entry["fisher_out"].shape == (96,) and entry["fisher_in"].shape == (32,)  # [out, in], not Conv1D's [in, out]


def test_act_and_cov_skip_padding(bert_fisher):
    """act/cov are over real tokens only: checked against inputs captured by an independent hook."""
    loaded, _, batches, stats = bert_fisher
    name = "bert.encoder.layer.0.intermediate.dense"
    assert any((b["attention_mask"] == 0).any() for b in batches), "fixture data should need padding"
    rows = []
    module = loaded.model.get_submodule(name)
    handle = module.register_forward_pre_hook(lambda m, args: rows.append(args[0].detach()))
    try:
        with torch.no_grad():
            for batch in batches:
                loaded.model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        handle.remove()
    x = torch.cat([r[b["attention_mask"].bool()] for r, b in zip(rows, batches)]).double()
    # Each batch's X^T X is a float32 product (only the sum over batches is float64): compare in
    # norm, relative 1e-6 (elementwise, cancellation makes near-zero entries differ by ~1e-5 relative).
    ref = x.T @ x
    assert torch.linalg.matrix_norm(stats.tensors[name]["cov"] - ref) <= 1e-6 * torch.linalg.matrix_norm(ref)
    torch.testing.assert_close(stats.tensors[name]["act_abs_mean"].double(), x.abs().mean(0), rtol=1e-5, atol=1e-8)
    assert stats.tensors[name]["cov"].dtype == torch.float64


def test_qkv_covariance_is_shared(bert_fisher):
    _, _, _, stats = bert_fisher
    for layer in (0, 1):
        prefix = f"bert.encoder.layer.{layer}.attention.self."
        owner = prefix + "query"
        assert stats.shared.get(prefix + "key") == owner
        assert stats.shared.get(prefix + "value") == owner
        assert owner not in stats.shared
        assert "cov" in stats.tensors[owner] and "cov" not in stats.tensors[prefix + "key"]
        assert stats.for_module(prefix + "value")["cov"] is stats.tensors[owner]["cov"]
    # Modules reading different inputs are not shared.
    assert "bert.encoder.layer.0.intermediate.dense" not in stats.shared


def test_llama_shares_qkv_and_gate_up(llama_dir, corpus_txt, fresh):
    loaded = fresh(llama_dir)
    names = [t.name for t in find_targets(loaded.model)]
    stats = collect_statistics(loaded.model, names, batches_for(loaded, corpus_txt, labels=False, samples=4), {"cov"}, progress=False)
    for layer in (0, 1):
        p = f"model.layers.{layer}."
        assert stats.shared[p + "self_attn.k_proj"] == p + "self_attn.q_proj"
        assert stats.shared[p + "self_attn.v_proj"] == p + "self_attn.q_proj"
        assert stats.shared[p + "mlp.up_proj"] == p + "mlp.gate_proj"
        assert p + "mlp.down_proj" not in stats.shared
        assert stats.for_module(p + "self_attn.k_proj")["cov"].shape == (32, 32)


def test_model_state_is_left_as_found(bert_dir, sst2_tsv, fresh):
    loaded = fresh(bert_dir)
    model = loaded.model
    model.train()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    sentinel = torch.full_like(model.classifier.weight, 7.0)
    model.classifier.weight.grad = sentinel
    target = "bert.encoder.layer.0.attention.self.query"
    target_grad = torch.ones_like(model.get_submodule(target).weight)
    model.get_submodule(target).weight.grad = target_grad
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    hooks_before = hook_counts(model)

    names = [t.name for t in find_targets(model)]
    collect_statistics(model, names, batches_for(loaded, sst2_tsv), {"fisher", "act", "cov"}, progress=False)

    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for n, p in model.named_parameters():
        assert p.grad is grads[n], n
    assert torch.equal(model.classifier.weight.grad, torch.full_like(sentinel, 7.0))
    assert torch.equal(model.get_submodule(target).weight.grad, torch.ones_like(target_grad))  # not accumulated into
    assert hook_counts(model) == hooks_before


def test_mixed_training_modes_are_restored(bert_dir, sst2_tsv, fresh):
    """SRC BUG: collect_statistics restores the mode with ``model.train(was_training)``, which
    overwrites per-submodule modes (here a frozen, eval-mode embedding inside a training model)."""
    loaded = fresh(bert_dir)
    model = loaded.model
    model.train()
    model.bert.embeddings.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    collect_statistics(model, ["bert.encoder.layer.0.output.dense"], batches_for(loaded, sst2_tsv), {"act"}, progress=False)
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_hooks_and_flags_restored_after_failure(bert_dir, sst2_tsv, fresh):
    loaded = fresh(bert_dir)
    model = loaded.model
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks_before = hook_counts(model)
    names = [t.name for t in find_targets(model)]
    unlabelled = batches_for(loaded, sst2_tsv, labels=False)
    with pytest.raises(FwsvdError, match="labels"):
        collect_statistics(model, names, unlabelled, {"fisher", "cov"}, progress=False)
    assert hook_counts(model) == hooks_before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_bad_arguments(bert_dir, fresh):
    loaded = fresh(bert_dir)
    with pytest.raises(FwsvdError, match="no calibration batches"):
        collect_statistics(loaded.model, ["bert.encoder.layer.0.output.dense"], [], {"act"}, progress=False)
    with pytest.raises(ValueError, match="unknown statistics"):
        collect_statistics(loaded.model, ["bert.encoder.layer.0.output.dense"], [], {"hessian"}, progress=False)
    assert hook_counts(loaded.model) == 0


def test_save_load_roundtrip_is_exact(bert_fisher, tmp_path):
    _, names, _, stats = bert_fisher
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    assert not list(tmp_path.glob("*.tmp"))
    back = Statistics.load(path)
    assert back.shared == stats.shared
    assert back.summary == stats.summary
    assert back.kinds == stats.kinds == frozenset({"fisher", "act", "cov"})
    for name in names:
        mine, theirs = stats.for_module(name), back.for_module(name)
        assert mine.keys() == theirs.keys(), name
        for key in mine:
            assert theirs[key].dtype == mine[key].dtype and torch.equal(theirs[key], mine[key]), (name, key)
    stored = {n: e for n, e in stats.tensors.items() if e}
    assert back.tensors.keys() == stored.keys()


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FwsvdError, match="does not exist"):
        Statistics.load(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(FwsvdError, match="not an fwsvd statistics file"):
        Statistics.load(foreign)


def test_fisher_with_model_labels_is_the_expected_squared_gradient(bert_dir, sst2_tsv, fresh):
    """``fisher_labels="model"``: the sum over examples and classes of ``p_c`` times the squared gradient
    of the example's loss for class ``c``, checked against autograd on each example alone; it differs
    from the empirical Fisher and is recorded in the summary."""
    loaded = fresh(bert_dir)
    name = "bert.encoder.layer.1.output.dense"
    batches = batches_for(loaded, sst2_tsv, samples=8)
    stats = collect_statistics(loaded.model, [name], batches, {"fisher"}, keep_full_fisher=True, progress=False, fisher_labels="model")
    empirical = collect_statistics(loaded.model, [name], batches, {"fisher"}, progress=False)
    weight = loaded.model.get_submodule(name).weight
    expected = torch.zeros_like(weight)
    loaded.model.eval()
    for example in single_examples(batches):
        one = {k: v for k, v in example.items() if k != "labels"}
        logits = loaded.model(**one).logits
        p = logits.detach().softmax(-1)[0]
        for c in range(logits.shape[-1]):
            (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, torch.tensor([c])), weight, retain_graph=True)
            expected += p[c] * grad.square()
    # Same float32 quantities by another route (padded batch vs unpadded example): rel 1e-4.
    torch.testing.assert_close(stats.tensors[name]["fisher_full"], expected, rtol=1e-4, atol=1e-10)
    # An untrained binary head predicts p ~ 0.5, where the two agree to first order: they still differ.
    assert not torch.allclose(stats.tensors[name]["fisher_out"], empirical.tensors[name]["fisher_out"], rtol=1e-5, atol=0)
    assert stats.summary["fisher_labels"] == "model" and empirical.summary["fisher_labels"] == "data"
    with pytest.raises(FwsvdError, match="must be one of data, model"):
        collect_statistics(loaded.model, [name], batches, {"fisher"}, progress=False, fisher_labels="true")


def test_calibration_config_checks_fisher_labels():
    with pytest.raises(FwsvdError, match="--fisher-labels 'sampled' must be"):
        api.CalibrationConfig(fisher_labels="sampled")
    with pytest.raises(FwsvdError, match="drop --low-memory"):
        api.CalibrationConfig(fisher_labels="model", low_memory=True)
    assert api.CalibrationConfig(fisher_labels="model").resolved("sequence-classification").fisher_labels == "model"


def _cov_of(loaded, names, batches):
    stats = collect_statistics(loaded.model, names, batches, {"cov"}, task=loaded.task, progress=False)
    return {n: e["cov"] for n, e in stats.tensors.items() if "cov" in e}


def _expected_rows(n, samples, cov_samples, seed=0):
    """What --cov-samples promises: the ``samples`` draw, plus rows of the wider draw it lacks, up to ``cov_samples`` in all."""
    import random

    def draw(k):
        return sorted(random.Random(seed).sample(range(n), k)) if k < n else list(range(n))

    taken = draw(samples)
    return taken, [i for i in draw(cov_samples) if i not in set(taken)][: cov_samples - samples]


def test_cov_samples_widen_the_covariance_and_leave_fisher_alone(llama_dir, corpus_txt):
    from fwsvd import data as d
    from fwsvd.calibration.calibrate import calibrate

    loaded = load_model(llama_dir)
    names = [t.name for t in find_targets(loaded.model)]
    narrow = calibrate(loaded, api.CalibrationConfig(data=str(corpus_txt), samples=4, cov_samples=4, batch_size=4, max_length=16), {"fisher", "cov"}, progress=False)
    wide = calibrate(loaded, api.CalibrationConfig(data=str(corpus_txt), samples=4, cov_samples=9, batch_size=4, max_length=16), {"fisher", "cov"}, progress=False)
    blocks = d.causal_blocks_from_file(loaded.tokenizer, corpus_txt, 16)
    taken, extra = _expected_rows(len(blocks), 4, 9)
    assert len(extra) == 5
    rows = blocks[sorted(taken + extra)]
    expected = _cov_of(loaded, names, [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in rows.split(4)])
    for name in names:
        for key in ("fisher_out", "fisher_in"):
            torch.testing.assert_close(wide.tensors[name][key], narrow.tensors[name][key], rtol=0, atol=0)
        if name in expected:
            torch.testing.assert_close(wide.tensors[name]["cov"], expected[name], rtol=1e-9, atol=1e-9)
            assert not torch.allclose(wide.tensors[name]["cov"], narrow.tensors[name]["cov"])
    assert wide.shared == narrow.shared
    assert wide.summary["samples"] == 4 and wide.summary["cov_samples"] == 9 and wide.summary["cov_tokens"] == 9 * 16
    assert "cov_samples" not in narrow.summary
    # Unnamed, a causal LM's covariance takes 8 x the Fisher's blocks (here all 37 of the text's); named
    # equal to --samples, it is the Fisher's own.
    default = calibrate(loaded, api.CalibrationConfig(data=str(corpus_txt), samples=4, batch_size=4, max_length=16), {"fisher", "cov"}, progress=False)
    assert default.summary["cov_samples"] == 32 and default.summary["cov_tokens"] == 32 * 16
    for name in names:
        torch.testing.assert_close(default.tensors[name]["fisher_out"], narrow.tensors[name]["fisher_out"], rtol=0, atol=0)


def test_forward_only_pass_skips_the_heads_logits_and_gives_the_same_covariance(llama_dir, corpus_txt, monkeypatch):
    from fwsvd import data as d
    from fwsvd.calibration import statistics as st

    loaded = load_model(llama_dir)
    names = [t.name for t in find_targets(loaded.model)]
    blocks = d.causal_blocks_from_file(loaded.tokenizer, corpus_txt, 16)[:8]
    batches = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in blocks.split(4)]
    assert st.forward_only_options(loaded.model, names, "causal-lm") == {"logits_to_keep": 1}
    # A head that is a target, or another task, keeps every position's logits.
    assert st.forward_only_options(loaded.model, [*names, "lm_head"], "causal-lm") == {}
    assert st.forward_only_options(loaded.model, names, "sequence-classification") == {}
    seen = []
    forward = loaded.model.forward
    @functools.wraps(forward)  # keeps forward's signature, which the option is looked up in
    def spy(*a, **k):
        seen.append(k.get("logits_to_keep"))
        return forward(*a, **k)

    monkeypatch.setattr(loaded.model, "forward", spy)
    trimmed = _cov_of(loaded, names, batches)
    assert seen == [1, 1]
    monkeypatch.setattr(st, "forward_only_options", lambda *a: {})
    full = _cov_of(loaded, names, batches)
    assert seen == [1, 1, None, None] and trimmed.keys() == full.keys() and trimmed
    for name in full:
        torch.testing.assert_close(trimmed[name], full[name], rtol=0, atol=0)


def test_cov_samples_on_labelled_rows(bert_dir, sst2_tsv):
    from fwsvd import data as d
    from fwsvd.calibration.calibrate import calibrate

    loaded = load_model(bert_dir)
    names = [t.name for t in find_targets(loaded.model)]
    wide = calibrate(loaded, api.CalibrationConfig(data=str(sst2_tsv), samples=8, cov_samples=20, batch_size=8, max_length=16), {"fisher", "cov"}, progress=False)
    examples = d.read_labelled(sst2_tsv)
    taken, extra = _expected_rows(len(examples), 8, 20)
    # The same rows through the plain calibration path: the covariance of the union, in one pass.
    cfg = api.CalibrationConfig(data=str(sst2_tsv), samples=len(examples), batch_size=8, max_length=16)
    every, _ = calibration_batches(loaded, cfg, labels=False)
    single = list(single_examples(every))
    union = [single[i] for i in sorted(taken + extra)]
    expected = _cov_of(loaded, names, union)
    for name, cov in expected.items():
        torch.testing.assert_close(wide.tensors[name]["cov"], cov, rtol=1e-6, atol=1e-6)
    assert wide.summary["cov_samples"] == 20


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--stats", "S"], "--stats reuses"),
        (["--method", "svd"], "uses no input covariance"),
        (["--sequential"], "--sequential collects"),
        (["--low-memory"], "--low-memory"),
        (["--samples", "16"], "--cov-samples 8 is below the 16 calibration samples"),
    ],
)
def test_cov_samples_refused_where_it_does_nothing(capsys, tmp_path, llama_dir, corpus_txt, argv, needle):
    from fwsvd.cli import main

    argv = [a if a != "S" else str(tmp_path / "s.safetensors") for a in argv]
    if "--stats" in argv:
        (tmp_path / "s.safetensors").write_bytes(b"")
    data = [] if "--stats" in argv else ["--data", str(corpus_txt)]
    status = main(["compress", str(llama_dir), "--out", str(tmp_path / "o"), "--keep", "0.5", *data, "--cov-samples", "8", "--max-length", "16", *argv, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()
