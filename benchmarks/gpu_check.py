"""The device check of ``--device``: CPU and GPU agree, MiniLM compresses on the device, a 7B-shaped stack streams.

    python benchmarks/gpu_check.py --device cuda               # the GPU machine (about 4-6 minutes)
    python benchmarks/gpu_check.py --device cpu --size tiny    # CI-sized, seconds (tests/test_gpu_check.py)

Three checks, one table, one JSON file (``benchmarks/results/gpu-check-<device>[-tiny].{json,md}``, with
the command, machine and date):

1. **equality** -- a tiny Llama (built from a config, random weights, a word-level tokenizer built
   here) compressed with fwsvd at keep 0.5 on the CPU and on ``--device``: the ranks must be equal and
   the perplexity of held-out text within 0.5 % (``ok`` in the table says whether they are).
2. **minilm** -- MiniLM-L6 SST-2 (``--minilm``, default ``../shared/models/minilm-l6-sst2``, with
   ``--sst2`` holding train.tsv and dev.tsv) calibrated and compressed on the device (fwsvd, keep 0.5)
   and scored on the dev set, against the dense model on the same device; once calibrated in
   float32 and once in bfloat16 (``--calibration-dtype``), the measured cost of half precision. A
   machine without the folder gets a "not available" row.
3. **stack** -- a synthetic Llama-2-7B-shaped model (hidden 4096, MLP 11008, 32 heads, vocabulary
   32000) of ``--blocks`` blocks with random float16 weights, written to a temporary folder and
   compressed with ``--low-memory`` on the device (fwsvd, keep 0.5, global allocation, 32 x 512
   calibration tokens: the defaults for a causal LM). Reported: seconds per block of calibration
   and of factorization, the peak GPU memory, and the extrapolation to Llama-2-7B's 32 blocks.

Needs only PyTorch, transformers and the repository (no download, no scikit-learn/SciPy). Not a
test: nothing here asserts; ``ok`` is a column.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fwsvd import api
from fwsvd import data as d
from fwsvd.compression.lowmem import compress_low_memory
from fwsvd.device import memory_report, reset_peak_memory, resolve_device
from fwsvd.evaluation.evaluate import EvalConfig, evaluate

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
RESULTS = HERE / "results"
LLAMA2_7B_BLOCKS = 32

#: ``full``: the GPU machine's sizes; ``tiny``: the same checks CI-sized (seconds on a CPU).
SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "tiny_samples": 16, "tiny_length": 64, "minilm_samples": 512, "minilm_dev": None, "minilm_length": 128,
        "stack": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
        "stack_samples": 32, "stack_length": 512,
        "kernel_tokens": (1, 16, 512, 4096), "kernel_rounds": 25, "kernel_bytes": 512 * 2**20,
    },
    "tiny": {
        "tiny_samples": 8, "tiny_length": 32, "minilm_samples": 8, "minilm_dev": 32, "minilm_length": 32,
        "stack": {"hidden_size": 64, "intermediate_size": 172, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000},
        "stack_samples": 4, "stack_length": 32,
        "kernel_tokens": (1, 8), "kernel_rounds": 3, "kernel_bytes": 2**20,
    },
}


def word_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer over ``w4 .. w<vocab_size - 1>`` plus four special tokens, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", *(f"w{i}" for i in range(4, vocab_size))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")


def write_text(path: Path, vocab_size: int, words: int, seed: int) -> Path:
    """Random text over the tokenizer's words, with a bigram habit so that a model has something to fit."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab_size, (words,), generator=g)
    ids[1::2] = (ids[0::2][: ids[1::2].numel()] * 7) % (vocab_size - 4) + 4
    path.write_text("\n".join(" ".join(f"w{i}" for i in ids[k : k + 20].tolist()) for k in range(0, words, 20)) + "\n", encoding="utf-8")
    return path


def llama_folder(folder: Path, shape: dict[str, Any], blocks: int, device: torch.device, seed: int = 0) -> Path:
    """A Llama of ``blocks`` blocks with random float16 weights (made on ``device``, written from the CPU) and a tokenizer."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=blocks, max_position_embeddings=4096, bos_token_id=2, eos_token_id=3, pad_token_id=0, **shape)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    g = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, param in skeleton.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("norm.weight"):
            state[name] = torch.ones(param.shape, dtype=torch.float16)
        else:
            state[name] = (torch.randn(param.shape, generator=g, device=device) * 0.02).half().cpu()
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.dtype = "float16"
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    word_tokenizer(shape["vocab_size"]).save_pretrained(folder)
    return folder


def _ranks(model: torch.nn.Module) -> dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, api.LowRankLinear)}


def check_equality(device: torch.device, tmp: Path, size: dict[str, Any]) -> dict[str, Any]:
    """A tiny Llama compressed on the CPU and on ``device``: ranks equal, perplexity within 0.5 %."""
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 200}
    folder = llama_folder(tmp / "tiny-llama", shape, 2, torch.device("cpu"), seed=1)
    train = write_text(tmp / "tiny-train.txt", 200, 20_000, seed=2)
    test = write_text(tmp / "tiny-test.txt", 200, 4_000, seed=3)
    runs = {}
    for where in ("cpu", str(device)):
        loaded = api.load_model(folder)
        config = api.CompressConfig(method="fwsvd", keep=0.5)
        calibration = api.CalibrationConfig(data=str(train), samples=size["tiny_samples"], max_length=size["tiny_length"], device=where)
        start = time.perf_counter()
        stats = api.calibrate(loaded, calibration, config.needs(loaded.task), progress=False)
        api.compress(loaded.model, config, stats, task=loaded.task, progress=False)
        seconds = time.perf_counter() - start
        ppl = evaluate(loaded, EvalConfig(data=str(test), max_length=size["tiny_length"]), progress=False)["perplexity"]
        runs[where] = {"ranks": _ranks(loaded.model), "perplexity": ppl, "seconds": round(seconds, 3)}
    cpu, dev = runs["cpu"], runs[str(device)]
    gap = abs(dev["perplexity"] - cpu["perplexity"]) / cpu["perplexity"]
    ok = cpu["ranks"] == dev["ranks"] and gap <= 0.005
    return {
        "check": "equality", "ok": ok, "ranks_equal": cpu["ranks"] == dev["ranks"], "perplexity_cpu": cpu["perplexity"],
        "perplexity_device": dev["perplexity"], "relative_gap": gap, "seconds": dev["seconds"],
        "result": f"ranks {'equal' if cpu['ranks'] == dev['ranks'] else 'DIFFER'}; ppl {cpu['perplexity']:.3f} (cpu) vs {dev['perplexity']:.3f} ({gap:.2%})",
    }


def _accuracy(loaded: Any, path: Path, limit: int | None, max_length: int, device: torch.device) -> float:
    """Dev-set accuracy without scikit-learn (the device machine may lack it)."""
    examples = d.read_labelled(path, limit=limit)
    targets, _, _ = d.model_label_mapping(examples.labels, loaded.model.config, source=str(path))
    items = d.encode_examples(loaded.tokenizer, examples, max_length)
    predictions: list[int] = []
    loaded.model.eval()
    with torch.inference_mode():
        for batch in d.batches(items, 64, loaded.tokenizer.pad_token_id):
            predictions += loaded.model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).tolist()
    return sum(int(p == t) for p, t in zip(predictions, targets)) / len(targets)


def check_minilm(device: torch.device, model: Path, sst2: Path, size: dict[str, Any]) -> dict[str, Any]:
    """MiniLM-L6 SST-2 compressed on ``device`` (fwsvd, keep 0.5) and scored there, against the dense model;
    calibrated in float32 and again in bfloat16 (``--calibration-dtype``), to measure what half precision costs."""
    if not (model / "config.json").is_file() or not (sst2 / "train.tsv").is_file() or not (sst2 / "dev.tsv").is_file():
        return {"check": "minilm", "ok": None, "result": f"not available: no {model} or {sst2}/train.tsv, dev.tsv (pass --minilm, --sst2)"}
    runs: dict[str, dict[str, Any]] = {}
    dense = None
    for dtype in ("float32", "bfloat16"):
        loaded = api.load_model(model)
        loaded.model.to(device)
        if dense is None:
            dense = _accuracy(loaded, sst2 / "dev.tsv", size["minilm_dev"], size["minilm_length"], device)
        config = api.CompressConfig(method="fwsvd", keep=0.5)
        calibration = api.CalibrationConfig(
            data=str(sst2 / "train.tsv"), samples=size["minilm_samples"], max_length=size["minilm_length"], device=str(device), compute_dtype=dtype,
        )
        reset_peak_memory(device)
        start = time.perf_counter()
        stats = api.calibrate(loaded, calibration, config.needs(loaded.task), progress=False)
        calibrated = time.perf_counter()
        api.compress(loaded.model, config, stats, task=loaded.task, progress=False)
        done = time.perf_counter()
        runs[dtype] = {
            "accuracy": _accuracy(loaded, sst2 / "dev.tsv", size["minilm_dev"], size["minilm_length"], device),
            "calibration_seconds": round(calibrated - start, 3), "factorization_seconds": round(done - calibrated, 3),
            "peak_gpu_bytes": memory_report(device).get("peak_gpu_bytes"),
        }
    full, half = runs["float32"], runs["bfloat16"]
    return {
        "check": "minilm", "ok": True, "dense_accuracy": dense, "accuracy": full["accuracy"], "accuracy_bfloat16_calibration": half["accuracy"],
        "runs": runs, "seconds": round(full["calibration_seconds"] + full["factorization_seconds"], 3), "peak_gpu_bytes": full["peak_gpu_bytes"],
        "result": f"dev accuracy {dense:.4f} dense -> {full['accuracy']:.4f} at keep 0.5 ({half['accuracy']:.4f} calibrated in bfloat16)",
    }


def check_stack(device: torch.device, tmp: Path, size: dict[str, Any], blocks: int, progress: bool = True) -> dict[str, Any]:
    """The synthetic Llama-2-7B-shaped stack, compressed with --low-memory on ``device``; per-block times and the extrapolation."""
    start = time.perf_counter()
    folder = llama_folder(tmp / "stack", size["stack"], blocks, device, seed=4)
    text = write_text(tmp / "stack.txt", size["stack"]["vocab_size"], size["stack_samples"] * size["stack_length"] * 2, seed=5)
    built = time.perf_counter() - start
    config = api.CompressConfig(method="fwsvd", keep=0.5)
    calibration = api.CalibrationConfig(data=str(text), samples=size["stack_samples"], max_length=size["stack_length"], low_memory=True, device=str(device))
    reset_peak_memory(device)
    start = time.perf_counter()
    # Progress bars on stderr: a run cut short by a time limit still shows how far it got.
    report, _ = compress_low_memory(str(folder), tmp / "stack-out", config, calibration, progress=progress)
    seconds = time.perf_counter() - start
    memory = memory_report(device)
    calibration_s = float(report.calibration["seconds"])
    factorization_s = float(report.seconds_factorize)
    per_block = {"calibration": calibration_s / blocks, "factorization": factorization_s / blocks}
    extrapolated = (per_block["calibration"] + per_block["factorization"]) * LLAMA2_7B_BLOCKS
    return {
        "check": "stack", "ok": True, "blocks": blocks, "shape": size["stack"], "calibration_tokens": size["stack_samples"] * size["stack_length"],
        "build_seconds": round(built, 3), "seconds": round(seconds, 3), "calibration_seconds": round(calibration_s, 3),
        "factorization_seconds": round(factorization_s, 3), "calibration_seconds_per_block": round(per_block["calibration"], 3),
        "factorization_seconds_per_block": round(per_block["factorization"], 3), "peak_gpu_bytes": memory.get("peak_gpu_bytes"),
        "peak_rss_bytes": memory["peak_rss_bytes"], "extrapolated_llama2_7b_seconds": round(extrapolated, 1),
        "result": f"per block: calibration {per_block['calibration']:.2f} s, factorization {per_block['factorization']:.2f} s; "
        f"Llama-2-7B ({LLAMA2_7B_BLOCKS} blocks) ~{extrapolated / 60:.1f} min",
    }


#: Ranks timed by ``kernels``, as fractions of a shape's break-even rank ``out * in / (out + in)``:
#: 0.5 is the rank at which the two factors hold half the dense parameters (keep 0.5, uniform).
KERNEL_FRACTIONS = (0.25, 0.5, 0.75)


def _elapsed(fn: Any, device: torch.device) -> float:
    """Seconds one call of ``fn`` takes on ``device`` (CUDA events on a GPU, which time the queued kernels)."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1000
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def check_kernels(device: torch.device, size: dict[str, Any]) -> dict[str, Any]:
    """Dense ``x W^T`` against the two thin products ``(x B^T) A^T`` at the stack's layer shapes, on ``device``.

    The compute dtype is bfloat16 on a GPU (how LLMs are served there) and float32 on the CPU. Many copies
    of each layer's weights are cycled through (``kernel_bytes`` of them, more than the GPU's L2 cache), as
    in a model whose weights stream from memory at every token; times are interleaved (dense, then each
    rank, round after round) and a speed-up is the median over the rounds of dense time / low-rank time.
    """
    import statistics

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden, mlp = size["stack"]["hidden_size"], size["stack"]["intermediate_size"]
    shapes = {"attention (q, k, v, o)": (hidden, hidden), "mlp gate, up": (mlp, hidden), "mlp down": (hidden, mlp)}
    g = torch.Generator(device=device).manual_seed(6)
    start = time.perf_counter()
    results = []
    for label, (out_f, in_f) in shapes.items():
        even = out_f * in_f / (out_f + in_f)
        ranks = {f: max(1, round(f * even)) for f in KERNEL_FRACTIONS}
        copies = max(2, size["kernel_bytes"] // (out_f * in_f * torch.finfo(dtype).bits // 8))
        dense = [torch.randn(out_f, in_f, generator=g, device=device, dtype=dtype) for _ in range(copies)]
        factors = {
            f: [(torch.randn(r, in_f, generator=g, device=device, dtype=dtype), torch.randn(out_f, r, generator=g, device=device, dtype=dtype))
                for _ in range(copies)]
            for f, r in ranks.items()
        }
        for tokens in size["kernel_tokens"]:
            x = torch.randn(tokens, in_f, generator=g, device=device, dtype=dtype)
            runs = {"dense": lambda x=x, weights=dense: [x @ w.T for w in weights]}
            runs.update({f: (lambda x=x, pairs=pairs: [(x @ b.T) @ a.T for b, a in pairs]) for f, pairs in factors.items()})
            times: dict[Any, list[float]] = {k: [] for k in runs}
            with torch.inference_mode():
                for fn in runs.values():  # warm-up: kernels chosen, caches and clocks settled
                    fn()
                for _ in range(size["kernel_rounds"]):
                    for k, fn in runs.items():
                        times[k].append(_elapsed(fn, device) / copies)
            dense_s = statistics.median(times["dense"])
            for f, r in ranks.items():
                speedups = [d / t for d, t in zip(times["dense"], times[f])]
                results.append({"shape": label, "out": out_f, "in": in_f, "tokens": tokens, "fraction_of_break_even": f, "rank": r,
                                "dense_us": round(dense_s * 1e6, 2), "low_rank_us": round(statistics.median(times[f]) * 1e6, 2),
                                "speedup": round(statistics.median(speedups), 3)})
        del dense, factors
    half = [r["speedup"] for r in results if r["fraction_of_break_even"] == 0.5]
    return {
        "check": "kernels", "ok": True, "dtype": str(dtype).removeprefix("torch."), "rounds": size["kernel_rounds"], "results": results,
        "seconds": round(time.perf_counter() - start, 3),
        "result": f"{str(dtype).removeprefix('torch.')} products at half the parameters (0.5 of break-even rank): "
        f"{min(half):.2f}-{max(half):.2f} x dense over {len(shapes)} shapes x tokens {', '.join(map(str, size['kernel_tokens']))}",
    }


def machine(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "load_average_at_start": round(os.getloadavg()[0], 2)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=int(props.total_memory), cuda=torch.version.cuda)
    return info


def table(rows: list[dict[str, Any]]) -> list[list[str]]:
    gib = lambda n: "-" if n is None else f"{n / 2**30:.2f}"  # noqa: E731
    return [
        [r["check"], {True: "yes", False: "NO", None: "-"}[r["ok"]], f"{r['seconds']:.1f}" if "seconds" in r else "-", gib(r.get("peak_gpu_bytes")), r["result"]]
        for r in rows
    ]


def render(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def render_markdown(record: dict[str, Any], out: Path) -> None:
    """The ``.md`` beside ``out`` (a JSON record): the command, machine, date and the table."""
    machine_text = ", ".join(f"{k} {v}" for k, v in record["machine"].items())
    partial = "" if record.get("complete", True) else " (cut short: the checks after the last row did not finish)"
    text = render(["check", "ok", "seconds", "peak GPU GiB", "result"], table(record["rows"]))
    for row in record["rows"]:
        if row["check"] == "kernels":
            kernels = [[r["shape"], f"{r['out']} x {r['in']}", str(r["tokens"]), f"{r['fraction_of_break_even']:g}", str(r["rank"]),
                        f"{r['dense_us']:.1f}", f"{r['low_rank_us']:.1f}", f"{r['speedup']:.2f}"] for r in row["results"]]
            text += f"\n\nkernels ({row['dtype']}, median of {row['rounds']} interleaved rounds; speed-up = dense / low rank):\n\n" + render(
                ["shape", "out x in", "tokens", "of break-even", "rank", "dense us", "low-rank us", "speed-up"], kernels)
    out.with_suffix(".md").write_text(
        f"# {out.stem}\n\n`{record['command']}` on {machine_text}; {record['date']}, {record['wall_seconds']} s in all{partial}\n\n```\n{text}\n```\n",
        encoding="utf-8",
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--size", choices=list(SIZES), default="full", help="full: the GPU machine's sizes; tiny: CI-sized (seconds on a CPU)")
    p.add_argument("--blocks", type=int, default=4, help="blocks of the Llama-2-7B-shaped stack")
    p.add_argument("--minilm", type=Path, default=SHARED / "models" / "minilm-l6-sst2", help="MiniLM-L6 SST-2 model folder")
    p.add_argument("--sst2", type=Path, default=SHARED / "data" / "sst2", help="folder with train.tsv and dev.tsv")
    p.add_argument("--checks", default="equality,minilm,stack,kernels", help="comma-separated subset of equality, minilm, stack, kernels")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/gpu-check-<device>[-tiny].json)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON", help="only rewrite the .md table of a results file")
    args = p.parse_args(argv)
    if args.render is not None:
        record = json.loads(args.render.read_text(encoding="utf-8"))
        render_markdown(record, args.render)
        return record
    device = resolve_device(args.device)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    size = SIZES[args.size]
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    name = f"gpu-check-{device.type}{'-tiny' if args.size == 'tiny' else ''}"
    out = args.out or RESULTS / f"{name}.json"
    record = {
        "command": " ".join([Path(sys.argv[0]).name if argv is None else "gpu_check.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": str(device), "size": args.size,
        "machine": machine(device), "complete": False, "wall_seconds": 0.0, "rows": rows,
    }
    with tempfile.TemporaryDirectory(prefix="fwsvd-gpu-check-") as scratch:
        tmp = Path(scratch)
        for check in args.checks.split(","):
            if check == "equality":
                rows.append(check_equality(device, tmp, size))
            elif check == "minilm":
                rows.append(check_minilm(device, args.minilm, args.sst2, size))
            elif check == "stack":
                rows.append(check_stack(device, tmp, size, args.blocks, progress=args.size == "full"))
            elif check == "kernels":
                rows.append(check_kernels(device, size))
            else:
                p.error(f"unknown check {check!r}: choose from equality, minilm, stack, kernels")
            print(render(["check", "ok", "seconds", "peak GPU GiB", "result"], table(rows[-1:])).splitlines()[-1], file=sys.stderr, flush=True)
            # Written after every check: a run cut short by the machine's time limit keeps what it measured.
            record["wall_seconds"] = round(time.perf_counter() - started, 1)
            write_record(record, out)
    record["complete"] = True
    write_record(record, out)
    print(render(["check", "ok", "seconds", "peak GPU GiB", "result"], table(rows)))
    return record


def write_record(record: dict[str, Any], out: Path) -> None:
    """The JSON record and its ``.md`` table (rewritten whole, so a partial run leaves a readable file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    render_markdown(json.loads(json.dumps(record, default=str)), out)


if __name__ == "__main__":
    main()
