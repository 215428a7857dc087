#!/bin/bash
# A lent GPU machine's session, prepared here and run there in one call (see docs/gpu.md).
#
#   bash benchmarks/gpu_session.sh prepare    # here: .gpucarry/ with MiniLM-L6 SST-2 (weights stored in float16,
#                                             # 46 MB: the float32 file is over the 64 MiB a call carries) and SST-2
#   bash benchmarks/gpu_session.sh run        # there (carry .gpucarry): gpu_check.py, then the suite with a GPU visible
#
# `run` writes under $OUT: gpu-check-cuda.{json,md} (rewritten after every check), gpu_check.log,
# pytest.log, versions.txt, nvidia-smi.txt. Every step has a hard time limit (SIGKILL: fwsvd's own
# SIGTERM handler would turn a plain `timeout` into a clean stop of one test and carry on).
set -u
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
    SHARED=${SHARED:-../shared}
    mkdir -p .gpucarry/minilm .gpucarry/sst2
    cp "$SHARED"/data/sst2/train.tsv "$SHARED"/data/sst2/dev.tsv .gpucarry/sst2/
    cp "$SHARED"/models/minilm-l6-sst2/{config.json,tokenizer.json,tokenizer_config.json} .gpucarry/minilm/
    ${PY:-.venv/bin/python} - "$SHARED/models/minilm-l6-sst2/model.safetensors" .gpucarry/minilm/model.safetensors <<'PYEOF'
import sys
from safetensors.torch import load_file, save_file
state = load_file(sys.argv[1])
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}, sys.argv[2], metadata={"format": "pt"})
PYEOF
    du -sh .gpucarry
    ;;
run)
    OUT=${OUT:-/tmp/gpu-session}; mkdir -p "$OUT"
    export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
    PY=${PY:-python3}; DEV=${DEV:-cuda}; SIZE=${SIZE:-full}
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt" 2>&1
    $PY -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, torch.version.cuda, transformers.__version__, torch.cuda.is_available())" | tee "$OUT/versions.txt"
    timeout -s KILL "${GC_TIMEOUT:-330}" $PY benchmarks/gpu_check.py --device "$DEV" --size "$SIZE" --minilm .gpucarry/minilm --sst2 .gpucarry/sst2 \
        --checks equality,minilm,kernels,stack --out "$OUT/gpu-check-$DEV.json" 2> "$OUT/gpu_check.log"
    echo "gpu_check rc $?"
    # The suite with a GPU visible: the DEVICES-parametrised tests gain their cuda cases, and `auto` picks the GPU
    # everywhere. The files that need lm-eval, gguf or datasets (absent on the device image) are left out.
    XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
    timeout -s KILL "${PT_TIMEOUT:-150}" $PY -m pytest -q -p no:cacheprovider $XDIST --maxfail 40 --ignore tests/test_data.py \
        --ignore tests/test_decoder.py --ignore tests/test_speed_paths.py --ignore tests/test_zeroshot.py > "$OUT/pytest.log" 2>&1
    echo "pytest rc $?"
    grep -E "passed|failed" "$OUT/pytest.log" | tail -n 1
    grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -n 40
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh prepare|run" >&2; exit 2
    ;;
esac
