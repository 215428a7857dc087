"""``fwsvd inspect``: a model's parameters, kept fraction and ranks."""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_output_options, fmt_int, table


def add_parser(sub: Any) -> None:
    """Add the ``inspect`` command to the subparsers ``sub``."""
    from ..storage.loading import TASKS

    i = sub.add_parser("inspect", help="parameters, kept fraction and ranks of a model", description="Show a model's parameters and ranks.")
    i.add_argument("model", metavar="MODEL", help="model folder or hub id")
    i.add_argument("--task", choices=list(TASKS), default=None, help="model task (detected when omitted)")
    add_output_options(i)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``fwsvd inspect``: load the model, return :func:`fwsvd.api.inspect`'s record plus its task."""
    from .. import api
    from ..storage.loading import load_model

    loaded = load_model(args.model, args.task, allow_pickle=args.allow_pickle)
    result = api.inspect(loaded.model)
    result["task"] = loaded.task
    return result


def format_result(result: dict[str, Any]) -> str:
    """The human summary of a model: parameters, keep, how it was compressed and stored, its ranks."""
    lines = [
        f"task              {result['task']}",
        f"compressed        {result['compressed']}" + (f" ({result['method']}, fwsvd {result['library_version']})" if result["compressed"] else ""),
        f"parameters        {fmt_int(result['parameters'])}",
        f"dense parameters  {fmt_int(result['dense_parameters'])}",
        f"model keep        {result['model_keep']:.4f}",
        f"target keep       {result['target_keep']:.4f}",
    ]
    if result.get("allocation"):
        alloc = result["allocation"]
        # Values from a config file anyone may have written: shown only when they are numbers.
        number = lambda key: isinstance(alloc.get(key), (int, float)) and not isinstance(alloc.get(key), bool)  # noqa: E731
        rules = [f"rank floor {alloc['rank_floor']:g}"] if number("rank_floor") else []
        if number("dense_above"):
            rules.append(f"dense above {alloc['dense_above']:g} of break-even")
        if alloc.get("dense_choice") == "loss":
            rules.append("dense where the loss estimate pays for it")
        auto = alloc.get("dense_choice_auto")
        if isinstance(auto, dict):
            scores = auto.get("heldout_perplexity") if isinstance(auto.get("heldout_perplexity"), dict) else {}
            shown = ", ".join(f"{rule} {ppl:.4g}" for rule, ppl in scores.items() if isinstance(ppl, (int, float)) and not isinstance(ppl, bool))
            rules.append(f"dense choice {alloc.get('dense_choice', 'break-even')} chosen on held-out text" + (f": perplexity {shown}" if shown else ": both rules agreed"))
        if number("rank_multiple"):
            rules.append(f"ranks in multiples of {alloc['rank_multiple']:g}")
        lines.append(f"allocation        {alloc.get('mode')}" + (f" ({', '.join(rules)})" if rules else ""))
    correction = result.get("correction")
    if isinstance(correction, dict) and isinstance(correction.get("step"), (int, float)) and not isinstance(correction.get("step"), bool):
        rounds = correction.get("rounds")
        taken = [r["step"] for r in rounds if isinstance(r, dict) and r.get("step")] if isinstance(rounds, list) else []
        if len(taken) > 1:
            lines.append(f"correction        {len(taken)} gradient steps of {', '.join(f'{t:g}' for t in taken)} per factor entry")
        else:
            lines.append(f"correction        one gradient step of {correction['step']:g} per factor entry" + (" (none taken)" if not correction["step"] else ""))
    if result.get("quantized_factors"):
        lines.append(f"factors stored as {result['quantized_factors']} (one float32 scale per row), computing in {result.get('dtype') or 'float32'}")
    if result.get("stored_dtype"):
        lines.append(f"weights stored as {result['stored_dtype']}" + (f", computing in {result['dtype']}" if result.get("dtype") else ""))
    elif result.get("factor_dtype"):
        lines.append(f"factors stored as {result['factor_dtype']} (other weights in the model's dtype)")
    if result.get("rank_table"):
        lines += ["", _rank_table(result["rank_table"])]
    if result["ranks"]:
        lines += ["", table(["layer", "rank"], sorted(result["ranks"].items(), key=lambda kv: kv[0]))]
    grid = result.get("quantized_weights")
    if grid:
        lines.append(f"quantized weights {grid['scheme']}, {grid['model_bytes']:,} bytes of the dense model's {grid['dense_bytes']:,} ({grid['model_fraction']:.4f})")
        rows = [[name, f"int{e['bits']}", e["group_size"], e["rank"], f"{e['weight']:,}", f"{e['scales']:,}", f"{e['correction']:,}"]
                for name, e in grid["layers"].items()]
        lines += ["", table(["layer", "grid", "group", "correction rank", "grid bytes", "scale bytes", "correction bytes"], rows)]
    return "\n".join(lines)


def _rank_table(rank_table: dict[str, Any]) -> str:
    """One row per layer type: its rank at each depth ('-' = dense), so the allocation shows."""
    rows = []
    for kind, entry in rank_table.items():
        kept = [r for r in entry["ranks"] if r is not None]
        median = sorted(kept)[len(kept) // 2] if kept else "-"
        by_depth = " ".join("-" if r is None else str(r) for r in entry["ranks"])
        rows.append([kind, str(len(entry["ranks"]) - len(kept)), str(median), by_depth])
    return table(["layer type", "dense", "median rank", "rank by depth ('-' dense)"], rows)
