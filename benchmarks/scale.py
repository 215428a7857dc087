"""Scale benchmark: peak memory and wall time of ``fwsvd compress`` in memory and with ``--low-memory``.

    python benchmarks/scale.py                      # SmolLM2-135M, both modes, then the synthetic 7B-shaped blocks
    python benchmarks/scale.py --skip-synthetic     # SmolLM2 only

SmolLM2-135M (the float32 folder ``benchmarks/.cache/smollm2-135m`` that ``benchmarks/decoder.py``
makes), default method (fwsvd, global ranks) at keep 0.8 on 16 blocks of 512 tokens of WikiText-2
``valid.txt``, batch 4, in three modes, each in a fresh process measured by ``/usr/bin/time -v``
(peak resident set size) and scored by ``fwsvd eval`` (perplexity on the first 24 blocks of 512
tokens of ``test.txt``):

* ``one-pass``: the default, the whole model and one whole-model backward pass per micro-batch;
* ``streamed-fisher``: the model in memory, calibration one block at a time
  (``CalibrationConfig(low_memory=True)``: what ``--low-memory`` does for a GGUF file or hub id);
* ``low-memory``: ``fwsvd compress --low-memory``, weights read from disk one block at a time.

Then a synthetic Llama with 7B-shaped blocks (hidden 4096, intermediate 11008, 32 heads, 8 KV heads,
random weights, a 1,024-word vocabulary; 2 blocks unless ``--synthetic-blocks``), compressed with
``--low-memory``: its peak is one block's working set plus the fixed part (interpreter, libraries),
measured alone; with several block counts, equal peaks show that memory does not grow with depth.
The 7B/70B table extrapolates from that measurement (see ``extrapolate``).

Every heavy process runs under ``flock`` on ``--lock`` (the machine's shared lock), one at a time.
Writes ``benchmarks/results/scale.{json,md}`` with the command, the machine and the date. Not a
test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared"
if not SHARED.is_dir():
    SHARED = Path("/work/shared")
VALID = SHARED / "data" / "wikitext-2" / "valid.txt"
TEST = SHARED / "data" / "wikitext-2" / "test.txt"
CACHE = HERE / ".cache"
SMOLLM2 = CACHE / "smollm2-135m"
if not SMOLLM2.is_dir() and Path("/work/main/benchmarks/.cache/smollm2-135m").is_dir():
    SMOLLM2 = Path("/work/main/benchmarks/.cache/smollm2-135m")
RESULTS = HERE / "results"
STEM = "scale"

KEEP = 0.8
# The in-memory modes are compared with --low-memory like for like: the covariance on the 16 Fisher
# blocks and the break-even rule, what --low-memory does (the one-pass defaults for causal LMs since
# 2026-12-04 take the covariance on 8 x the blocks and choose the rule on held-out text).
CALIBRATION = ["--samples", "16", "--max-length", "512", "--batch-size", "4", "--cov-samples", "16", "--dense-choice", "break-even"]
#: --low-memory at its own default batch (1 example: the block working set grows with the batch).
LOW_MEMORY_CALIBRATION = ["--samples", "16", "--max-length", "512"]
EVAL = ["--limit", "24", "--max-length", "512"]
#: The synthetic model: Llama-2-7B's block shape (with Llama-3's 8 KV heads), a small vocabulary.
SHAPE_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 8}
SYNTHETIC_VOCAB = 1024
#: Synthetic calibration: 2 blocks of 512 tokens in one micro-batch, uniform ranks (one decomposition
#: per layer: on 2 CPUs each 7B-shaped block's eigendecompositions and SVDs take minutes).
SYNTHETIC_CALIBRATION = ["--samples", "2", "--max-length", "512", "--batch-size", "2", "--allocation", "uniform"]
#: Real shapes for the extrapolation (float32 weights, as fwsvd loads them).
TARGETS = {
    "Llama-2-7B": {"hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 32, "blocks": 32, "vocab": 32000, "tied": False},
    "Llama-3-8B": {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "blocks": 32, "vocab": 128256, "tied": False},
    "Llama-2-70B": {"hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8, "blocks": 80, "vocab": 32000, "tied": False},
}


def fwsvd_cmd(*args: str) -> list[str]:
    # The installed ``fwsvd`` script's entry point, run by this interpreter (no ``python -m fwsvd`` needed).
    return [sys.executable, "-c", "import sys; from fwsvd.cli import main; sys.exit(main(sys.argv[1:]))", *args]


def measured(cmd: list[str], lock: str | None, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd`` in a fresh process under the lock; its peak RSS (GiB), wall time and stdout."""
    wrapped = ["/usr/bin/time", "-v", *cmd]
    if lock:
        wrapped = ["flock", lock, *wrapped]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(wrapped, capture_output=True, text=True, env=env)
    waited = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    parts = [float(p) for p in wall.split(":")]
    seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    return {"peak_rss_gib": round(rss_kb / 2**20, 3), "wall_seconds": round(seconds, 1), "waited_seconds": round(waited, 1), "stdout": proc.stdout}


STREAMED_FISHER = """
import sys, fwsvd
from fwsvd import api
model, out = sys.argv[1], sys.argv[2]
loaded = fwsvd.load_model(model)
config = api.CompressConfig(method="fwsvd", keep=float(sys.argv[3]))
calibration = api.CalibrationConfig(data=sys.argv[4], samples=16, max_length=512, batch_size=4, low_memory=True)
stats = api.calibrate(loaded, calibration, config.needs(loaded.task), progress=False)
report = api.compress(loaded.model, config, stats, task=loaded.task, progress=False)
api.save(loaded.model, out, loaded.tokenizer)
import json; print(json.dumps(report.to_dict()))
"""


def smollm2(work: Path, lock: str | None, env: dict[str, str], modes: list[str]) -> list[dict[str, Any]]:
    rows = []
    size = sum(f.stat().st_size for f in SMOLLM2.glob("*.safetensors"))
    for mode in modes:
        out = work / f"smollm2-{mode}"
        if mode == "streamed-fisher":
            cmd = [sys.executable, "-c", STREAMED_FISHER, str(SMOLLM2), str(out), str(KEEP), str(VALID)]
        else:
            calibration = CALIBRATION if mode != "low-memory" else LOW_MEMORY_CALIBRATION
            cmd = fwsvd_cmd("compress", str(SMOLLM2), "--out", str(out), "--keep", str(KEEP), "--data", str(VALID), *calibration, "--quiet", "--json")
            if mode == "low-memory":
                cmd.append("--low-memory")
        run = measured(cmd, lock, env)
        report = json.loads(run.pop("stdout").strip().splitlines()[-1])
        ev = measured(fwsvd_cmd("eval", str(out), "--data", str(TEST), *EVAL, "--quiet", "--json"), lock, env)
        perplexity = json.loads(ev["stdout"].strip().splitlines()[-1])
        rows.append(
            {
                "mode": mode,
                "peak_rss_gib": run["peak_rss_gib"],
                "model_file_gib": round(size / 2**30, 3),
                "peak_over_model": round(run["peak_rss_gib"] * 2**30 / size, 2),
                "wall_seconds": run["wall_seconds"],
                "seconds_calibration": report["seconds_calibration"],
                "seconds_factorize": report["seconds_factorize"],
                "tokens": report["calibration"]["tokens"],
                "batch_size": report["calibration"]["batch_size"],
                "model_keep": round(report["model_keep"], 4),
                "perplexity": round(_perplexity(perplexity), 3),
                "ranks_digest": hash_ranks(report),
            }
        )
        print(rows[-1], flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def _perplexity(result: dict[str, Any]) -> float:
    for key in ("perplexity",):
        if key in result:
            return float(result[key])
    for value in result.values():
        if isinstance(value, dict):
            try:
                return _perplexity(value)
            except KeyError:
                continue
    raise KeyError("perplexity")


def hash_ranks(report: dict[str, Any]) -> str:
    import hashlib

    ranks = [(r["name"], r["rank"]) for r in report["layers"]]
    return hashlib.sha256(json.dumps(ranks).encode()).hexdigest()[:12]


def build_synthetic(folder: Path, blocks: int) -> Path:
    """A Llama with 7B-shaped blocks and random float32 weights, written one tensor group at a time."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    words = collections.Counter(VALID.read_text(encoding="utf-8").split())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word, _ in words.most_common(SYNTHETIC_VOCAB - len(vocab)):
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>").save_pretrained(tmp)
    config = LlamaConfig(vocab_size=SYNTHETIC_VOCAB, num_hidden_layers=blocks, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=2, **SHAPE_7B)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp)
    h, i, heads, kv = (SHAPE_7B[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"))
    head_dim = h // heads
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        # Scaled like a trained model's weights (std 1/sqrt(fan-in)), so activations stay finite.
        return torch.randn(*shape, generator=gen) / shape[-1] ** 0.5

    weight_map = {}
    shards = [("rest", None), *[(f"layer{b}", b) for b in range(blocks)]]
    for n, (label, b) in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        if b is None:
            tensors = {"model.embed_tokens.weight": torch.randn(SYNTHETIC_VOCAB, h, generator=gen), "model.norm.weight": torch.ones(h), "lm_head.weight": rand(SYNTHETIC_VOCAB, h)}
        else:
            p = f"model.layers.{b}."
            tensors = {
                p + "input_layernorm.weight": torch.ones(h),
                p + "post_attention_layernorm.weight": torch.ones(h),
                p + "self_attn.q_proj.weight": rand(heads * head_dim, h),
                p + "self_attn.k_proj.weight": rand(kv * head_dim, h),
                p + "self_attn.v_proj.weight": rand(kv * head_dim, h),
                p + "self_attn.o_proj.weight": rand(h, heads * head_dim),
                p + "mlp.gate_proj.weight": rand(i, h),
                p + "mlp.up_proj.weight": rand(i, h),
                p + "mlp.down_proj.weight": rand(h, i),
            }
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}), encoding="utf-8")
    tmp.rename(folder)
    return folder


def block_params(shape: dict[str, Any]) -> int:
    h, i, heads, kv = shape["hidden"], shape["intermediate"], shape["heads"], shape["kv_heads"]
    d = h // heads
    return 2 * h * heads * d + 2 * h * kv * d + 3 * h * i + 2 * h


def synthetic(work: Path, lock: str | None, env: dict[str, str], counts: list[int]) -> list[dict[str, Any]]:
    rows = []
    for blocks in counts:
        folder = build_synthetic(CACHE / f"llama-7b-shape-{blocks}-blocks", blocks)
        out = work / f"synthetic-{blocks}"
        cmd = fwsvd_cmd("compress", str(folder), "--out", str(out), "--keep", str(KEEP), "--data", str(VALID), *SYNTHETIC_CALIBRATION, "--low-memory", "--quiet", "--json")
        run = measured(cmd, lock, env)
        report = json.loads(run.pop("stdout").strip().splitlines()[-1])
        rows.append(
            {
                "blocks": blocks,
                "peak_rss_gib": run["peak_rss_gib"],
                "wall_seconds": run["wall_seconds"],
                "seconds_calibration": report["seconds_calibration"],
                "seconds_factorize": report["seconds_factorize"],
                "tokens": report["calibration"]["tokens"],
                "block_weights_gib": round(block_params({"hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 8}) * 4 / 2**30, 3),
            }
        )
        print(rows[-1], flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def extrapolate(rows: list[dict[str, Any]], base_rss_gib: float | None) -> dict[str, Any]:
    """Memory per process and time per calibration token for real 7B/70B models, from the synthetic run.

    Memory: the synthetic peak minus the fixed part (``base_rss_gib``: interpreter and libraries,
    measured alone; the synthetic embeddings are negligible) is one 7B-shaped block's working set,
    dominated by its float32 weights and the float64 whitening of its widest input (covariance,
    eigenvectors, workspace). It is scaled by the ratio of (block weights + widest covariance) of
    the target, and the target's float32 embedding and head are added. Time: calibration and
    factorization seconds per block and calibration token, scaled by the ratio of block parameters
    (the work is products with the block's weights; the widest eigendecomposition grows faster, so
    70B is a lower bound) and multiplied by the number of blocks.
    """
    if not rows:
        return {}
    ref = {"hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 8}
    row = max(rows, key=lambda r: r["blocks"])
    tokens = row["tokens"]
    calib_per_block_token = row["seconds_calibration"] / row["blocks"] / tokens
    factorize_per_block = row["seconds_factorize"] / row["blocks"]
    peak = max(r["peak_rss_gib"] for r in rows)
    base = base_rss_gib or 0.0
    working = peak - base

    def cost(shape: dict[str, Any]) -> float:
        return block_params(shape) * 4 + max(shape["hidden"], shape["intermediate"]) ** 2 * 8

    out: dict[str, Any] = {
        "from_blocks": row["blocks"], "calibration_tokens": tokens, "peak_rss_gib_7b_shape": peak, "fixed_rss_gib": base,
        "block_working_set_gib": round(working, 2), "calibration_seconds_per_block_token": round(calib_per_block_token, 4),
        "factorization_seconds_per_block": round(factorize_per_block, 1), "targets": {},
    }
    for name, shape in TARGETS.items():
        ratio = block_params(shape) / block_params(ref)
        embed = shape["vocab"] * shape["hidden"] * 4 * (1 if shape["tied"] else 2) / 2**30
        memory = base + working * cost(shape) / cost(ref) + embed
        seconds_per_token = calib_per_block_token * ratio * shape["blocks"]
        dense = block_params(shape) * shape["blocks"] * 4 / 2**30 + embed
        out["targets"][name] = {
            "dense_float32_gib": round(dense, 1),
            "peak_rss_gib": round(memory, 1),
            "calibration_seconds_per_token": round(seconds_per_token, 2),
            "factorization_hours": round(factorize_per_block * ratio * shape["blocks"] / 3600, 1),
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Scale: peak memory and time of `fwsvd compress`",
        "",
        f"Date {result['date']}; machine: {result['machine']['processor']}, {result['machine']['cpu_count']} cores, "
        f"load {result['machine']['load_average_1min']}; command: `{result['command']}`.",
        "",
        f"## SmolLM2-135M, fwsvd (default) keep {KEEP}, 16 x 512 calibration tokens",
        "",
        "| mode | batch | peak RSS (GiB) | x float32 model | wall (s) | calibration (s) | factorization (s) | perplexity | ranks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["smollm2"]:
        lines.append(
            f"| {r['mode']} | {r.get('batch_size', '-')} | {r['peak_rss_gib']:.2f} | {r['peak_over_model']:.2f} | {r['wall_seconds']:.0f} | {r['seconds_calibration']:.0f} "
            f"| {r['seconds_factorize']:.0f} | {r['perplexity']:.2f} | {r['ranks_digest']} |"
        )
    if result.get("synthetic"):
        lines += [
            "",
            "## Synthetic Llama with 7B-shaped blocks (random weights, 1,024-word vocabulary), `--low-memory`, 2 x 512 tokens, batch 2, uniform ranks",
            "",
            "| blocks | peak RSS (GiB) | one block's float32 weights (GiB) | wall (s) | calibration (s) | factorization (s) |",
            "|---|---|---|---|---|---|",
        ]
        for r in result["synthetic"]:
            lines.append(
                f"| {r['blocks']} | {r['peak_rss_gib']:.2f} | {r['block_weights_gib']:.2f} | {r['wall_seconds']:.0f} | {r['seconds_calibration']:.0f} | {r['seconds_factorize']:.0f} |"
            )
    ex = result.get("extrapolation") or {}
    if ex.get("targets"):
        lines += [
            "",
            "## Extrapolation (`--low-memory`, one process; derived from the synthetic runs, see scale.py `extrapolate`)",
            "",
            "| model | dense float32 (GiB) | peak RSS per process (GiB) | calibration seconds per token | factorization hours (uniform ranks; global: x2) |",
            "|---|---|---|---|---|",
        ]
        for name, t in ex["targets"].items():
            lines.append(f"| {name} | {t['dense_float32_gib']} | {t['peak_rss_gib']} | {t['calibration_seconds_per_token']} | {t['factorization_hours']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="one-pass,streamed-fisher,low-memory", help="SmolLM2 modes to run (comma-separated; empty: none)")
    parser.add_argument("--skip-synthetic", action="store_true", help="skip the synthetic 7B-shaped runs")
    parser.add_argument("--synthetic-blocks", default="2", help="block counts of the synthetic model (comma-separated)")
    parser.add_argument("--lock", default="/tmp/fwsvd-heavy.lock", help="flock this file around each heavy process ('' for none)")
    parser.add_argument("--merge", action="store_true", help="keep the sections of an existing results file that this run does not redo")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from fwsvd.demo import machine_info

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{STEM}.json"
    result: dict[str, Any] = json.loads(path.read_text()) if args.merge and path.is_file() else {}
    result.update({"command": " ".join(["python", *sys.argv]), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info()})
    lock = args.lock or None
    with tempfile.TemporaryDirectory(prefix="fwsvd-scale-") as work:
        modes = [m for m in args.modes.split(",") if m]
        if modes:
            fresh = smollm2(Path(work), lock, env, modes)
            kept = [r for r in result.get("smollm2", []) if r["mode"] not in modes]
            order = ["one-pass", "streamed-fisher", "low-memory"]
            result["smollm2"] = sorted(kept + fresh, key=lambda r: order.index(r["mode"]) if r["mode"] in order else len(order))
        if not args.skip_synthetic:
            counts = [int(c) for c in args.synthetic_blocks.split(",")]
            base = measured([sys.executable, "-c", "import fwsvd, fwsvd.compression.lowmem, torch, transformers"], lock, env)["peak_rss_gib"]
            result["import_rss_gib"] = base
            result["synthetic"] = synthetic(Path(work), lock, env, counts)
            result["extrapolation"] = extrapolate(result["synthetic"], base)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (RESULTS / f"{STEM}.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))


if __name__ == "__main__":
    main()
