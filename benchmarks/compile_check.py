"""Does ``torch.compile`` help greedy decoding at batch 1 on this CPU, for dense and low-rank models?

    python benchmarks/compile_check.py                 # SmolLM2-135M dense, keep 0.5 and 0.8 (about 10 min on 2 cores)
    python benchmarks/compile_check.py --quick         # keep 0.5 only, mode=None only, 3 repetitions

SmolLM2-135M (float32, ``benchmarks/.cache/smollm2-135m``) dense and compressed with
``CompressConfig(method="svd", keep=K, allocation="uniform")`` (no calibration: the factor
values do not change the speed, the shapes do). Each model decodes ``--steps`` tokens greedily at
batch 1 after a ``--prompt``-token prompt, with the KV cache; only the decode steps are timed and
reported per token. Variants:

* ``eager-dynamic``: the plain forward with transformers' default ``DynamicCache`` (what
  ``model.generate`` does on CPU, and what ``benchmarks/speed.py`` measures);
* ``eager-static``: the plain forward with a ``StaticCache`` (the cache the compiled route needs);
* ``compile[MODE]``: transformers' static-cache + compile route done by hand: the prompt is run
  eagerly into a ``StaticCache``, each decode step calls ``torch.compile(model.forward, mode=MODE)``
  (``generate`` only auto-compiles on CUDA/XPU-type devices; on CPU it would need the private
  ``CompileConfig._compile_all_devices``). ``reduce-overhead`` means CUDA graphs and does nothing
  more than ``None`` on a CPU, so ``max-autotune-no-cudagraphs`` is the second mode;
* ``fused-lowrank`` (compressed models only): eager model, but every ``LowRankLinear`` runs one
  compiled function ``linear(linear(x, B), A, bias)`` (the "fused low-rank forward").

Compile time: seconds of the first compiled decode step (tracing + inductor codegen + the C++
build) less a warm step. All variants run interleaved, repetition after repetition, at
``--threads`` threads; each figure is the median over repetitions, each ratio the median over
repetitions of the per-repetition ratio. The tokens each variant generates are compared with
``eager-dynamic``'s. Writes ``benchmarks/results/compile-check.{json,md}``. Not a test.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# A fresh inductor cache, so that the compile times are cold ones (not served from an earlier run's cache).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fwsvd-compile-check-"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fwsvd  # noqa: E402
from fwsvd.demo import machine_info  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODEL = HERE / ".cache" / "smollm2-135m"
STEM = "compile-check"


def load_models(keeps: list[float]) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    models, info = {"dense": dense}, {"dense": {"parameters": sum(p.numel() for p in dense.parameters())}}
    for keep in keeps:
        model = copy.deepcopy(dense)
        report = fwsvd.compress(model, fwsvd.CompressConfig(method="svd", keep=keep, allocation="uniform"), task="causal-lm", progress=False)
        name = f"keep {keep:g}"
        models[name] = model.eval()
        info[name] = {"parameters": report.parameters_after, "model_keep": round(report.model_keep, 4),
                      "low_rank_layers": sum(1 for m in model.modules() if isinstance(m, fwsvd.LowRankLinear))}
    return models, info


def decode_run(model: torch.nn.Module, prompt: torch.Tensor, steps: int, static: Any | None, step_fn: Callable[..., Any] | None) -> tuple[float, list[int], list[float]]:
    """Prefill eagerly, then ``steps`` greedy steps; returns (seconds of the steps, tokens, seconds per step)."""
    fn = step_fn or model
    with torch.no_grad():
        if static is not None:
            static.reset()
            out = model(prompt, cache=static, use_cache=True, logits_to_keep=1)
        else:
            out = model(prompt, use_cache=True, logits_to_keep=1)
        cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        tokens, per_step = [int(token)], []
        pos = prompt.shape[1]
        start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            out = fn(token, cache=cache, position_ids=torch.tensor([[pos]]), use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
            per_step.append(time.perf_counter() - t0)
            pos += 1
        return time.perf_counter() - start, tokens, per_step


_FUSED: dict[str, Any] = {}


def _lowrank_fused(x: torch.Tensor, b: torch.Tensor, a: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(F.linear(x, b), a, bias)


class FusedLowRank:
    """Context: every ``LowRankLinear`` of the process runs one compiled ``linear(linear(x, B), A, bias)``."""

    def __enter__(self) -> None:
        if "fn" not in _FUSED:
            _FUSED["fn"] = torch.compile(_lowrank_fused, dynamic=False)
        self.saved = fwsvd.LowRankLinear.forward
        fn = _FUSED["fn"]
        fwsvd.LowRankLinear.forward = lambda layer, x: fn(x, layer.weight_in, layer.weight_out, layer.bias)  # type: ignore[method-assign]

    def __exit__(self, *exc: Any) -> None:
        fwsvd.LowRankLinear.forward = self.saved  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.8])
    parser.add_argument("--modes", nargs="+", default=["default", "max-autotune-no-cudagraphs"], help="torch.compile modes ('default' = mode=None)")
    parser.add_argument("--no-fused", action="store_true", help="skip the fused-lowrank variant")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 5, --quick 3)")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.keeps, args.modes = [0.5], ["default"]
    args.reps = args.reps or (3 if args.quick else 5)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    import transformers

    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    record: dict[str, Any] = {
        "benchmark": "compile-check",
        "command": "python benchmarks/compile_check.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv)),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "load_average_before": [round(v, 2) for v in os.getloadavg()],
        "note": "the machine is shared with other jobs (load average recorded before, per repetition and after)",
        "settings": {"model": "SmolLM2-135M float32", "keeps": args.keeps, "modes": args.modes, "reps": args.reps, "prompt": args.prompt,
                     "decode_steps": args.steps, "threads": args.threads, "batch": 1,
                     "compression": "fwsvd.compress, CompressConfig(method='svd', keep=K, allocation='uniform')"},
        "compiler": {"cxx": shutil.which("g++") or shutil.which("c++"), "inductor_cpp_compiler": getattr(torch._inductor.config.cpp, "cxx", None)},
    }
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    from transformers import StaticCache

    models, info = load_models(args.keeps)
    record["models"] = info
    gen = torch.Generator().manual_seed(0)
    vocab = models["dense"].config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=gen)
    max_len = args.prompt + args.steps + 1

    # Every (model, variant): a callable running one timed decode.
    runs: dict[tuple[str, str], Callable[[], tuple[float, list[int], list[float]]]] = {}
    compile_info: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for name, model in models.items():
        static = StaticCache(config=model.config, max_cache_len=max_len)
        runs[(name, "eager-dynamic")] = lambda m=model: decode_run(m, prompt, args.steps, None, None)
        runs[(name, "eager-static")] = lambda m=model, s=static: decode_run(m, prompt, args.steps, s, None)
        for mode in args.modes:
            variant = f"compile[{mode}]"
            step = torch.compile(model.forward, mode=None if mode == "default" else mode)
            print(f"compiling {name} {variant} ...", flush=True)
            try:
                t0 = time.perf_counter()
                _, _, per_step = decode_run(model, prompt, 3, static, step)
                total = time.perf_counter() - t0
                compile_info[f"{name} / {variant}"] = {"first_step_s": round(per_step[0], 2), "warm_step_s": round(per_step[-1], 4),
                                                       "compile_s": round(per_step[0] - per_step[-1], 1), "first_run_s": round(total, 1),
                                                       "load_average": round(os.getloadavg()[0], 2)}
                print(f"  compile {per_step[0]:.1f} s (steps {[round(s, 4) for s in per_step]})", flush=True)
                runs[(name, variant)] = lambda m=model, s=static, f=step: decode_run(m, prompt, args.steps, s, f)
            except Exception as exc:  # the result is then that it does not run, with the error line
                errors[f"{name} / {variant}"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                traceback.print_exc()
        if name != "dense" and not args.no_fused:
            def fused(m: torch.nn.Module = model) -> tuple[float, list[int], list[float]]:
                with FusedLowRank():
                    return decode_run(m, prompt, args.steps, None, None)

            print(f"compiling {name} fused-lowrank ...", flush=True)
            try:
                t0 = time.perf_counter()
                _, _, per_step = fused()
                compile_info[f"{name} / fused-lowrank"] = {"first_run_s": round(time.perf_counter() - t0, 1), "load_average": round(os.getloadavg()[0], 2),
                                                           "note": "first run compiles the prefill and decode shapes of each layer kind"}
                runs[(name, "fused-lowrank")] = fused
            except Exception as exc:
                errors[f"{name} / fused-lowrank"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                traceback.print_exc()
    record["compile"] = compile_info
    record["errors"] = errors

    # Warm every variant once, then interleaved repetitions.
    reference: dict[str, list[int]] = {}
    for (name, variant), run in runs.items():
        _, tokens, _ = run()
        if variant == "eager-dynamic":
            reference[name] = tokens
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    same: dict[tuple[str, str], bool] = {}
    rep_load = []
    for rep in range(args.reps):
        rep_load.append(round(os.getloadavg()[0], 2))
        for key, run in runs.items():
            seconds, tokens, _ = run()
            times[key].append(seconds / args.steps)
            same[key] = same.get(key, True) and tokens == reference[key[0]]
        print(f"rep {rep + 1}/{args.reps} load {rep_load[-1]}: " + "  ".join(f"{k[0]}/{k[1]} {v[-1] * 1e3:.1f}" for k, v in times.items()), flush=True)
    record["load_average_per_rep"] = rep_load

    rows = []
    for (name, variant), values in times.items():
        eager = times[(name, "eager-dynamic")]
        eager_static = times[(name, "eager-static")]
        # The fused variant has no dense counterpart: against the dense model's eager-dynamic time.
        dense_same = times.get(("dense", variant if variant != "fused-lowrank" else "eager-dynamic"))
        rows.append({
            "model": name, "variant": variant,
            "ms_per_token": round(statistics.median(values) * 1e3, 2),
            "ms_per_token_all": [round(v * 1e3, 2) for v in values],
            "vs_eager_dynamic": round(statistics.median(e / v for e, v in zip(eager, values)), 3),
            "vs_eager_static": round(statistics.median(e / v for e, v in zip(eager_static, values)), 3),
            "dense_vs_this_same_variant": round(statistics.median(d / v for d, v in zip(dense_same, values)), 3) if dense_same else None,
            "tokens_match_eager": same[(name, variant)],
        })
    record["rows"] = rows
    record["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    record["seconds_total"] = round(time.perf_counter() - started, 1)
    (out_dir / f"{STEM}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    write_report(record, out_dir / f"{STEM}.md")
    print((out_dir / f"{STEM}.md").read_text(encoding="utf-8"))
    return 0


def write_report(record: dict[str, Any], path: Path) -> None:
    m, s = record["machine"], record["settings"]
    lines = [
        "# torch.compile at batch-1 decoding (SmolLM2-135M, CPU)", "",
        f"Command: `{record['command']}`  ",
        f"Date: {record['date']}; total {record['seconds_total']} s  ",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']}, transformers {m['transformers']}, fwsvd {m['fwsvd']}  ",
        f"Load average before {record['load_average_before']}, per repetition {record['load_average_per_rep']}, after {record['load_average_after']} "
        "(the machine is shared with another job)  ",
        f"Settings: batch 1, {s['prompt']}-token prompt, {s['decode_steps']} greedy steps with the KV cache timed, {s['threads']} threads, "
        f"{s['reps']} interleaved repetitions (median); compressed models: {s['compression']}  ",
        f"C++ compiler for inductor: {record['compiler']['cxx']}", "",
        "ms/token: median decode step. `x eager` = eager-dynamic time / this time (above 1: faster); `x eager-static` likewise against the same "
        "static cache; `dense / this` = the dense model's time in the same variant (for fused-lowrank: dense eager-dynamic) / this model's time (above 1: the compressed model is faster).", "",
        "| model | variant | ms/token | x eager | x eager-static | dense / this | same tokens |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in record["rows"]:
        d = "" if r["model"] == "dense" or r["dense_vs_this_same_variant"] is None else f"{r['dense_vs_this_same_variant']:.2f}"
        lines.append(f"| {r['model']} | {r['variant']} | {r['ms_per_token']:.2f} | {r['vs_eager_dynamic']:.2f} | {r['vs_eager_static']:.2f} | {d} | "
                     f"{'yes' if r['tokens_match_eager'] else 'no'} |")
    lines += ["", "## Compile time", "", "| model / variant | compile s | first step s | warm step s | load |", "|---|---:|---:|---:|---:|"]
    for key, c in record["compile"].items():
        lines.append(f"| {key} | {c.get('compile_s', '')} | {c.get('first_step_s', c.get('first_run_s', ''))} | {c.get('warm_step_s', '')} | {c['load_average']} |")
    if record["errors"]:
        lines += ["", "## Errors", ""] + [f"- {k}: `{v}`" for k, v in record["errors"].items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
