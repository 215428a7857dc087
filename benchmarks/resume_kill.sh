#!/bin/bash
# Usage: bash benchmarks/resume_kill.sh > benchmarks/results/resume-smollm2.log   (WORK=dir keeps the files)
# kill -9 during calibration of SmolLM2 (default fwsvd keep 0.8), then the same command again.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-$(mktemp -d)}
cd "$WORK"
M=$ROOT/benchmarks/.cache/smollm2-135m  # made by benchmarks/decoder.py
D=${SHARED:-$ROOT/../shared}/data/wikitext-2
CMD="$ROOT/.venv/bin/fwsvd compress $M --out out --method fwsvd --keep 0.8 --data $D/valid.txt --samples 16 --max-length 512 --seed 0 --checkpoint-every 1 --quiet --json"
echo "\$ $CMD"
start=$(date +%s)
OMP_WAIT_POLICY=PASSIVE $CMD > first.json 2> first.err &
pid=$!
# wait 35 s past the first checkpoint (about half of the 4 batches), then kill -9
while true; do
  if [ -f .out.checkpoint.safetensors ]; then
    n=$(( $(date +%s) - start ))
    if [ -z "$seen" ]; then seen=$n; echo "first checkpoint after ${n}s"; fi
    if [ $n -ge $(( seen + 35 )) ]; then break; fi
  fi
  sleep 1
done
kill -9 $pid; wait $pid 2>/dev/null
echo "killed after $(( $(date +%s) - start ))s; out exists: $([ -e out ] && echo yes || echo no); checkpoint: $(ls -la .out.checkpoint.safetensors | awk '{print $5}') bytes"
$ROOT/.venv/bin/python -c "
from safetensors import safe_open
with safe_open('.out.checkpoint.safetensors','pt') as f: print('checkpoint metadata', {k: v[:200] for k, v in (f.metadata() or {}).items()})"
s2=$(date +%s)
OMP_WAIT_POLICY=PASSIVE $CMD > second.json 2> second.err
echo "rerun rc=$? in $(( $(date +%s) - s2 ))s; checkpoint left: $(ls .out.checkpoint* 2>/dev/null | wc -l)"
grep -i "resum" second.err | head -3
$ROOT/.venv/bin/fwsvd eval out --data $D/test.txt --limit 24 --max-length 512 --quiet --json
