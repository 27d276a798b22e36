#!/usr/bin/env bash
# Reliability on the GPU machine's own torch (2.11, CUDA): the CPU fault-injection and bad-input
# tests on that torch; a CUDA run (bf16-master) killed inside a checkpoint save and run again,
# against one never killed; what checksums cost at the 1.1B shape. Output under $OUT.
#   bash bench/gpu_reliability.sh   (the engine's light deps importable: the H200 image lacks
#   pydantic, carried there as wheels on PYTHONPATH)
set -uo pipefail
OUT=${OUT:-/tmp/lmforge-out}
W=/tmp/lmforge-rel
mkdir -p "$OUT"
rm -rf "$W"
export PYTHONUNBUFFERED=1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/machine.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_faults.py tests/test_bad_inputs.py \
    -k "not docs" >"$OUT/faults_cpu_tests.txt" 2>&1
tail -3 "$OUT/faults_cpu_tests.txt"

python3 -m engine generate-corpus --output "$W/corpus" --documents 2000 --shards 1 >/dev/null
python3 -m engine train-tokenizer --input "$W/corpus" --output "$W/tok" --vocab-size 512 >/dev/null
python3 -m engine tokenize --input "$W/corpus" --output-prefix "$W/ds" \
    --tokenizer "$W/tok/tokenizer.model" --append-eod --no-progress >/dev/null
spec() {  # $1: save folder
    cat >"$1.yaml" <<YAML
model: {vocab_size: 512, hidden_size: 256, intermediate_size: 512, num_layers: 4, num_heads: 4,
        num_kv_heads: 2, max_position_embeddings: 256}
data: {blend: [$W/ds_text_document], seq_length: 128}
checkpoint: {save: $1, interval: 20, keep_last: 1}
iters: 60
micro_batch_size: 4
global_batch_size: 16
precision: bf16-master
device: cuda
log_interval: 1
YAML
}
spec "$W/ref"; spec "$W/killed"
python3 -m engine pretrain --config "$W/ref.yaml" >/dev/null 2>"$OUT/cuda_ref.log"
echo "reference exit $?"
python3 tests/fault_runner.py "kill@engine.train.checkpoint:_commit#2" -- pretrain \
    --config "$W/killed.yaml" >/dev/null 2>"$OUT/cuda_killed.log"
echo "killed run exit $? (-9 expected: 137)"; ls "$W/killed"
python3 -m engine pretrain --config "$W/killed.yaml" >/dev/null 2>"$OUT/cuda_resumed.log"
echo "resumed exit $?"
python3 - "$W" <<'PY' | tee "$OUT/cuda_resume_compare.txt"
import json, sys
from pathlib import Path
def losses(run):
    out = {}
    for line in (Path(sys.argv[1]) / run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "metrics" and "loss" in r["data"]:
            out[r["step"]] = r["data"]["loss"]
    return out
a, b = losses("ref"), losses("killed")
diff = max(abs(a[k] - b[k]) for k in a)
print(f"steps {len(a)} vs {len(b)}; identical losses: {a == b}; max |loss diff| {diff:.3g}")
print("resumed at", [l for l in (Path(sys.argv[1]) / "killed").iterdir()])
PY
grep -h "resumed from\|removing" "$OUT/cuda_resumed.log" | head -3
OMP_NUM_THREADS=8 timeout 400 python3 -m bench.checkpoint_io --hidden 2048 --layers 22 \
    --ffn 5632 --kv-heads 4 --dir /tmp 2>&1 | grep -v Warn | tee "$OUT/checkpoint_io_1b.txt"
