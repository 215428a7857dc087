"""Shared-basis factorization against separate factors, at equal parameters, on both benchmarks.

    python benchmarks/shared_basis.py --decoder-stats S_DEC --encoder-stats S_ENC

Layers that read the same input tensor (q/k/v, gate/up: whatever the model family calls them) can
share one right factor ``B`` with a left factor ``A_i`` each: the SVD of their stacked,
Fisher-row-weighted, whitened weights (:func:`fwsvd.core.shared_basis_svd`). The groups are the
ones calibration found: modules whose input covariance is shared (``Statistics.shared``), i.e.
that read the very same tensor in the calibration forward pass, never names.

Rows, on the same statistics (fwsvd's weighting: square roots of Fisher per output, whitened
inputs, the ``fwsvd`` method's damping):

``separate, uniform``
    ``fwsvd compress --allocation uniform``: every layer its own factors at its uniform rank.
``shared, uniform``
    The same model, each group's members replaced by shared-basis factors of rank
    ``floor(sum r_i (out_i + in) / (in + sum out_i))``: at most the parameters the separate factors
    hold, group by group (the difference is under one rank component). Other layers are untouched,
    so the rows differ only in the sharing.
``separate, global`` / ``shared, global`` (``--global-keeps``)
    fwsvd's default global rank allocation; the shared row prices each group's components by the
    stacked matrix's discarded values (the same Fisher loss estimate, summed over the members) and
    spends the same budget over groups and single layers.

Parameters are counted with ``B`` once per group (the evaluated model holds a copy of ``B`` in each
member: a quality measurement, not a storage format). Statistics come from saved files (``fwsvd
compress ... --save-stats``) on the benchmarks' protocols (checked against their summaries), or
are calibrated here with those protocols when no file is given.

Decoder: SmolLM2-135M (``benchmarks/.cache/smollm2-135m``, see benchmarks/decoder.py), perplexity on
the first 24 blocks of 512 tokens of WikiText-2 test. Encoder: MiniLM-L6 fine-tuned on SST-2, dev
accuracy (see benchmarks/encoder.py). Writes ``shared-basis.{json,md}``. Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

# Passive OpenMP threads on a shared machine (see benchmarks/decoder.py); before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fwsvd.demo import machine_info  # noqa: E402
from fwsvd.storage.atomic import atomic_write_text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared"
NAME = "shared-basis"

PARTS: dict[str, dict[str, Any]] = {
    "decoder": {
        "model": HERE / ".cache" / "smollm2-135m",
        "label": "SmolLM2-135M, WikiText-2 test perplexity (24 × 512 tokens)",
        "calibration": {"data": SHARED / "data" / "wikitext-2" / "valid.txt", "samples": 16, "cov_samples": 16, "max_length": 512, "batch_size": 4, "seed": 0},
        "evaluation": {"data": SHARED / "data" / "wikitext-2" / "test.txt", "limit": 24, "max_length": 512},
        "metric": "perplexity",
        "keeps": (0.8, 0.6),
    },
    "encoder": {
        "model": SHARED / "models" / "minilm-l6-sst2",
        "label": "MiniLM-L6 SST-2, dev accuracy (872 rows)",
        "calibration": {"data": SHARED / "data" / "sst2" / "train.tsv", "samples": 512, "max_length": 128, "seed": 0},
        "evaluation": {"data": SHARED / "data" / "sst2" / "dev.tsv", "max_length": 128},
        "metric": "accuracy",
        "keeps": (0.8, 0.5, 0.3),
    },
}
VARIANTS = ("separate, uniform", "shared, uniform", "separate, global", "shared, global")

log = logging.getLogger("benchmarks.shared_basis")


def groups_of(statistics: Any, names: list[str]) -> list[list[str]]:
    """Targeted modules that read one input tensor (two or more each), in model order.

    Calibration records them: a module whose covariance is stored under another's (its owner)
    read the very same tensor (:class:`fwsvd.calibration.statistics.ActivationHooks`).
    """
    members: dict[str, list[str]] = {}
    targeted = set(names)
    for name in names:
        owner = statistics.shared.get(name, name)
        if owner in targeted:
            members.setdefault(owner, []).append(name)
    return [group for group in members.values() if len(group) >= 2]


def group_type(names: list[str]) -> str:
    """``model.layers.*.self_attn.{q_proj,k_proj,v_proj}``: a group's members with the depth left out."""
    stems = [re.sub(r"\.\d+\.", ".*.", n) for n in names]
    prefix = os.path.commonprefix(stems).rpartition(".")[0]
    return f"{prefix}.{{{','.join(s[len(prefix) + 1:] for s in stems)}}}"


def _group_inputs(dense: Any, statistics: Any, method: Any, names: list[str]) -> tuple[list[Any], Any, list[Any], list[Any]]:
    """The members' dense weights, their shared covariance, row weights and biases."""
    import torch

    from fwsvd.nn import linear_bias, linear_weight

    modules = [dense.get_submodule(n) for n in names]
    weights = [linear_weight(m).detach() for m in modules]
    stats = [statistics.for_module(n) for n in names]
    cov = stats[0]["cov"]
    # One tensor object: calibration stored the covariance once, under the group's owner.
    assert all(s["cov"] is cov for s in stats), names
    rows = [method.row_weight(s) for s in stats]
    if any(r is None for r in rows):
        rows = [torch.ones(w.shape[0]) for w in weights]
    biases = [linear_bias(m) for m in modules]
    return weights, cov, rows, [None if b is None else b.detach() for b in biases]


def _member(a: Any, b: Any, bias: Any) -> Any:
    """One member of a shared-basis group as a module computing ``x B^T A^T + bias``.

    A shared rank may exceed a narrow member's own width (SmolLM2's 192-wide k/v projections
    under a 287-component q/k/v basis): ``LowRankLinear`` refuses a rank above ``min(out, in)``,
    so such a member is evaluated through the same product held dense. Either way the function is
    ``A_i B``; parameters are counted as shared, whatever this holds.
    """
    from torch import nn

    from fwsvd.nn import LowRankLinear

    if a.shape[1] <= min(a.shape[0], b.shape[1]):
        return LowRankLinear.from_factors(a, b, bias)
    layer = nn.Linear(b.shape[1], a.shape[0], bias=bias is not None, device=a.device, dtype=a.dtype)
    layer.weight.copy_(a @ b)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


def _swap_group(model: Any, names: list[str], lefts: list[Any], right: Any, biases: list[Any]) -> None:
    from fwsvd.nn import swap_module

    for name, a, bias in zip(names, lefts, biases):
        new = _member(a, right, bias)
        new.train(model.get_submodule(name).training)
        swap_module(model, name, new)


def shared_uniform(model: Any, dense: Any, statistics: Any, method: Any, report: Any, groups: list[list[str]], cache: dict[str, Any]) -> dict[str, Any]:
    """Replace each group's separate factors in ``model`` by shared-basis ones of at most their parameters.

    Also prices both with the method's loss estimate (the discarded whitened, Fisher-weighted
    values over the input energy, summed over the groups): what the factorization optimises,
    free of the evaluation's noise. ``cache`` keeps the decompositions between keeps.

    Returns:
        ``{"kept": targeted parameters kept (B counted once), "groups": {type: ranks},
        "estimate": {"separate": ..., "shared": ...}}``.
    """
    from fwsvd.core import shared_basis_decomposition

    layers = {r.name: r for r in report.layers}
    kept = sum(r.parameters_after for r in report.layers)
    ranks: dict[str, Any] = {}
    estimate = {"separate": 0.0, "shared": 0.0}
    for names in groups:
        if any(layers[n].rank is None for n in names):
            continue  # a member the separate row keeps dense stays dense here too
        weights, cov, rows, biases = _group_inputs(dense, statistics, method, names)
        stats = statistics.for_module(names[0])
        in_f = int(weights[0].shape[1])
        outs = [int(w.shape[0]) for w in weights]
        separate = sum(layers[n].rank * (o + in_f) for n, o in zip(names, outs))
        rank = min(separate // (in_f + sum(outs)), min(sum(outs), in_f))
        key = "|".join(names)
        if key not in cache:
            dec = shared_basis_decomposition(weights, cov, damping=method.damping, row_weights=rows)
            alone = [method.component_loss(method.decompose(w, statistics.for_module(n)), statistics.for_module(n)) for n, w in zip(names, weights)]
            cache[key] = (dec, method.component_loss(dec, stats), alone)
        dec, loss, alone = cache[key]
        a, right = dec.truncate(rank)
        _swap_group(model, names, list(a.split(outs)), right, biases)
        estimate["shared"] += float(loss[rank:].sum())
        estimate["separate"] += sum(float(c[layers[n].rank:].sum()) for n, c in zip(names, alone))
        kept += rank * (in_f + sum(outs)) - separate
        ranks.setdefault(group_type(names), {"separate": [layers[n].rank for n in names], "shared": rank, "parameters": [separate, rank * (in_f + sum(outs))]})
    return {"kept": kept, "groups": ranks, "estimate": estimate}


def shared_global(model: Any, statistics: Any, method: Any, keep: float, floor: float, groups: list[list[str]], targets: list[Any]) -> dict[str, Any]:
    """Global allocation over groups (one shared basis each) and single layers, then factorize ``model``.

    Each unit is decomposed once: single layers as the method does, groups by
    :func:`fwsvd.core.shared_basis_decomposition`; components are priced by the method's loss
    estimate (for a group: the stacked matrix's discarded value over the shared input's energy,
    the members' summed Fisher estimate) and :func:`fwsvd.core.allocate_ranks` spends ``keep`` of
    the targeted parameters.
    """
    import torch

    from fwsvd.core import allocate_ranks, dense_parameters, factorized_parameters, shared_basis_decomposition
    from fwsvd.nn import linear_bias, linear_weight

    in_group = {n for g in groups for n in g}
    units = groups + [[t.name] for t in targets if t.name not in in_group]
    info = {t.name: t for t in targets}
    decs, losses, shapes = [], [], []
    with torch.no_grad():
        for names in units:
            if len(names) == 1:
                stats = statistics.for_module(names[0])
                dec = method.decompose(linear_weight(model.get_submodule(names[0])).detach(), stats)
            else:
                weights, cov, rows, _ = _group_inputs(model, statistics, method, names)
                stats = statistics.for_module(names[0])
                dec = shared_basis_decomposition(weights, cov, damping=method.damping, row_weights=rows)
            decs.append(dec)
            losses.append(method.component_loss(dec, stats).double())
            out_f = sum(info[n].out_features for n in names)
            shapes.append((out_f, info[names[0]].in_features, all(info[n].bias for n in names)))
    ranks = allocate_ranks(losses, shapes, keep, floor=floor)
    kept = 0
    by_type: dict[str, list[Any]] = {}
    with torch.no_grad():
        for names, dec, rank, (out_f, in_f, bias) in zip(units, decs, ranks, shapes):
            biases = [linear_bias(model.get_submodule(n)) for n in names]
            bias_n = sum(info[n].out_features for n, b in zip(names, biases) if b is not None)
            if rank is None:
                kept += sum(dense_parameters(info[n].out_features, in_f, info[n].bias) for n in names)
            else:
                a, b = dec.truncate(rank)
                lefts = list(a.split([info[n].out_features for n in names]))
                _swap_group(model, names, lefts, b, [None if t is None else t.detach() for t in biases])
                kept += factorized_parameters(out_f, in_f, rank, False) + bias_n
            by_type.setdefault(group_type(names) if len(names) > 1 else re.sub(r"\.\d+\.", ".*.", names[0]), []).append(rank)
    summary = {k: {"median": _median(v), "dense": sum(r is None for r in v), "layers": len(v)} for k, v in by_type.items()}
    return {"kept": kept, "groups": summary}


def _median(ranks: list[int | None]) -> float | None:
    values = sorted(r for r in ranks if r is not None)
    if not values:
        return None
    mid = len(values) // 2
    return float(values[mid]) if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def load_or_calibrate(part: str, loaded: Any, path: Path | None) -> Any:
    """The part's statistics: from ``path`` (checked against the protocol) or calibrated now."""
    import fwsvd
    from fwsvd.calibration.files import load_statistics

    cal = {k: (str(v) if isinstance(v, Path) else v) for k, v in PARTS[part]["calibration"].items()}
    if path is not None:
        stats = load_statistics(path)
        made = {k: stats.summary.get(k) for k in ("samples", "max_length", "seed")}
        want = {k: cal[k] for k in ("samples", "max_length", "seed")}
        source = Path(str(stats.summary.get("data", ""))).name
        if made != want or source != Path(cal["data"]).name or not {"fisher", "cov"} <= set(stats.kinds):
            raise SystemExit(f"{path}: calibrated with {made} on {source} ({sorted(stats.kinds)}), the {part} protocol is {want} on {Path(cal['data']).name} (fisher, cov)")
        return stats
    log.info("%s: calibrating (%s)", part, cal)
    return fwsvd.calibrate(loaded, fwsvd.CalibrationConfig(**cal), {"fisher", "cov"}, progress=False)


def run_part(part: str, keeps: list[float], global_keeps: list[float], stats_path: Path | None) -> dict[str, Any]:
    import torch

    import fwsvd
    from fwsvd.evaluation.evaluate import EvalConfig, evaluate
    from fwsvd.nn import find_targets

    spec = PARTS[part]
    metric = spec["metric"]
    ev = {k: (str(v) if isinstance(v, Path) else v) for k, v in spec["evaluation"].items()}
    lm = fwsvd.load_model(spec["model"], need_tokenizer=True)
    dense = lm.model
    started = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]

    def score(model: Any) -> float:
        result = evaluate(fwsvd.LoadedModel(model, lm.tokenizer, lm.task, lm.source), EvalConfig(**ev), progress=False)
        return float(result[metric])

    dense_score = score(dense)
    log.info("%s dense: %s %.4f", part, metric, dense_score)
    statistics = load_or_calibrate(part, lm, stats_path)
    targets = find_targets(dense)
    groups = groups_of(statistics, [t.name for t in targets])
    log.info("%s: %d groups reading one input, e.g. %s", part, len(groups), group_type(groups[0]) if groups else None)
    target_dense = sum(t.out_features * t.in_features + (t.out_features if t.bias else 0) for t in targets)
    whole_dense = fwsvd.count_parameters(dense)
    rows: list[dict[str, Any]] = []
    cache: dict[str, Any] = {}

    def row(variant: str, keep: float, model: Any, kept: int, ranks: dict[str, Any], seconds: float, **extra: Any) -> None:
        value = score(model)
        rows.append({
            "variant": variant, "keep": keep, metric: value, "target_parameters": kept, "target_keep": kept / target_dense,
            "model_keep": (whole_dense - target_dense + kept) / whole_dense, "ranks": ranks, "seconds_build": round(seconds, 1), **extra,
        })
        log.info("%s %-18s keep %.2f: %s %.4f (targeted kept %.4f)", part, variant, keep, metric, value, kept / target_dense)

    with torch.no_grad():
        for keep in keeps:
            t0 = time.perf_counter()
            model = copy.deepcopy(dense)
            config = fwsvd.CompressConfig(method="fwsvd", keep=keep, allocation="uniform")
            method = config.build_method(lm.task)
            report = fwsvd.compress(model, config, statistics, task=lm.task, progress=False)
            layers = {r.name: r.rank for r in report.layers}
            sep_ranks = {group_type(g): {"separate": [layers[n] for n in g]} for g in groups}
            row("separate, uniform", keep, model, report.target_parameters_after, sep_ranks, time.perf_counter() - t0)
            t0 = time.perf_counter()
            shared = shared_uniform(model, dense, statistics, method, report, groups, cache)
            row("shared, uniform", keep, model, shared["kept"], shared["groups"], time.perf_counter() - t0, estimate=shared["estimate"])
            cache.clear()
        for keep in global_keeps:
            t0 = time.perf_counter()
            model = copy.deepcopy(dense)
            config = fwsvd.CompressConfig(method="fwsvd", keep=keep)
            method = config.build_method(lm.task)
            report = fwsvd.compress(model, config, statistics, task=lm.task, progress=False)
            row("separate, global", keep, model, report.target_parameters_after, {}, time.perf_counter() - t0)
            del model
            t0 = time.perf_counter()
            model = copy.deepcopy(dense)
            shared = shared_global(model, statistics, method, keep, config.rank_floor, groups, targets)
            row("shared, global", keep, model, shared["kept"], shared["groups"], time.perf_counter() - t0)
            del model
    return {
        "label": spec["label"],
        "model": str(spec["model"].relative_to(ROOT.parent) if spec["model"].is_relative_to(ROOT.parent) else spec["model"]),
        "metric": metric,
        "dense": dense_score,
        "statistics": str(stats_path) if stats_path else "calibrated in this run",
        "calibration": {k: (str(v.relative_to(ROOT.parent)) if isinstance(v, Path) else v) for k, v in spec["calibration"].items()},
        "evaluation": {k: (str(v.relative_to(ROOT.parent)) if isinstance(v, Path) else v) for k, v in spec["evaluation"].items()},
        "groups": sorted({group_type(g) for g in groups}),
        "target_dense_parameters": target_dense,
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
        "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
    }


def markdown(record: dict[str, Any]) -> str:
    m = record["machine"]
    lines = [
        "# Shared basis (one B per group reading one input) vs separate factors",
        "",
        f"`{record['command']}` — {record['date']}; {m['processor']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), "
        f"torch {m['torch']}, transformers {m['transformers']}, fwsvd {m['fwsvd']}; load average {record['load_average']['start']} at the start, "
        f"{record['load_average']['end']} at the end (1, 5, 15 min).",
        "",
        "fwsvd's weighting (Fisher per output, whitened inputs) for every row, from the same statistics. `uniform`: every group "
        "of one type the same ranks; the shared rank is `floor(sum r_i (out_i + in) / (in + sum out_i))`, so a group never holds "
        "more parameters shared than separate; other layers are identical. The last column prices the groups' truncation alone "
        "with fwsvd's loss estimate (discarded whitened, Fisher-weighted values over the input energy; what the factorization minimises). `global`: fwsvd's default allocation, over single layers "
        "and (shared rows) whole groups. `targeted kept`: the targeted layers' parameters that stay, `B` counted once per group.",
    ]
    for part, res in record["parts"].items():
        metric = res["metric"]
        lines += [
            "",
            f"## {part}: {res['label']}",
            "",
            f"Dense {metric} {res['dense']:.4g}. Groups: {', '.join(f'`{g}`' for g in res['groups'])}. Statistics: {res['statistics']}.",
            "",
            "| keep | separate, uniform | shared, uniform | separate, global | shared, global | targeted kept (sep / shared, uniform) | ranks per group (separate → shared, uniform) | groups' loss estimate, shared / separate |",
            "|---:|---:|---:|---:|---:|---|---|---:|",
        ]
        for keep in sorted({r["keep"] for r in res["rows"]}, reverse=True):
            by = {r["variant"]: r for r in res["rows"] if r["keep"] == keep}
            cells = [f"{by[v][metric]:.4g}" if v in by else "" for v in VARIANTS]
            kept = " / ".join(f"{by[v]['target_keep']:.4f}" for v in VARIANTS[:2] if v in by)
            groups = by.get("shared, uniform", {}).get("ranks", {})
            ranks = "; ".join(f"{g.rpartition('.')[2]}: {'+'.join(map(str, r['separate']))} → {r['shared']}" for g, r in groups.items())
            est = by.get("shared, uniform", {}).get("estimate")
            ratio = f"{est['shared'] / est['separate']:.3f}" if est and est["separate"] > 0 else ""
            lines.append(f"| {keep:g} | " + " | ".join(cells) + f" | {kept} | {ranks} | {ratio} |")
    lines += ["", f"Total {record['seconds_total']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    p.add_argument("--decoder-keeps", type=float, nargs="*", default=list(PARTS["decoder"]["keeps"]))
    p.add_argument("--encoder-keeps", type=float, nargs="*", default=list(PARTS["encoder"]["keeps"]))
    p.add_argument("--decoder-global-keeps", type=float, nargs="*", default=[0.8], help="decoder keeps that also get the global-allocation rows")
    p.add_argument("--encoder-global-keeps", type=float, nargs="*", default=[], help="encoder keeps that also get the global-allocation rows")
    p.add_argument("--decoder-stats", type=Path, default=None, help="statistics saved by `fwsvd compress --save-stats` on the decoder protocol (default: calibrate)")
    p.add_argument("--encoder-stats", type=Path, default=None, help="the same for the encoder protocol")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--merge", action="store_true", help="keep the parts and rows already in --out that this run does not remake")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    for part in args.parts:
        spec = PARTS[part]
        missing = [str(x) for x in (spec["model"] / "config.json", spec["calibration"]["data"], spec["evaluation"]["data"]) if not x.exists()]
        if missing:
            print(f"skipping the shared-basis benchmark: {', '.join(missing)} not found (see benchmarks/decoder.py and encoder.py)")
            return 0
    load_start = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    command = " ".join(["python", "benchmarks/shared_basis.py", *(sys.argv[1:] if argv is None else argv)])
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts: dict[str, Any] = {}
    path = args.out / f"{NAME}.json"
    previous = json.loads(path.read_text(encoding="utf-8")) if args.merge and path.is_file() else None
    if previous is not None:
        parts = dict(previous["parts"])
    for part in args.parts:
        keeps = args.decoder_keeps if part == "decoder" else args.encoder_keeps
        global_keeps = args.decoder_global_keeps if part == "decoder" else args.encoder_global_keeps
        stats = args.decoder_stats if part == "decoder" else args.encoder_stats
        fresh = run_part(part, keeps, global_keeps, stats)
        for r in fresh["rows"]:
            r["run"] = {"command": command, "date": date}
        before = (previous or {}).get("parts", {}).get(part)
        if before is not None:
            # Rows of an earlier run on the same statistics stay unless this run remade them.
            if (before["statistics"], before["dense"]) != (fresh["statistics"], fresh["dense"]):
                raise SystemExit(f"--merge: {path} holds {part} rows from {before['statistics']}, this run used {fresh['statistics']}")
            made = {(r["variant"], r["keep"]) for r in fresh["rows"]}
            fresh["rows"] = [r for r in before["rows"] if (r["variant"], r["keep"]) not in made] + fresh["rows"]
            fresh["seconds"] += before["seconds"]
        parts[part] = fresh
    record = {
        "benchmark": NAME,
        "command": command if previous is None else f"{previous['command']}; then {command}",
        "date": date,
        "machine": machine_info(),
        "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
        "parts": {k: parts[k] for k in PARTS if k in parts},
        "seconds_total": round(time.perf_counter() - started, 1) + (previous or {}).get("seconds_total", 0.0),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    atomic_write_text(args.out / f"{NAME}.md", markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
