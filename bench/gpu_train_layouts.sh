#!/usr/bin/env bash
# Training tokens/s, MFU and peak memory on one GPU through the real pretrain stage, for each
# activation recompute mode and under FSDP2 (bench/configs/gpu_layouts.yaml: 12 iterations, the
# last 4 measured; the job is stopped after them, before its final checkpoint: an 8B one would
# not fit the machine's disk). Logs under $OUT. The image lacks pydantic: carry .whl/py
# (`bash bench/gpu_generate.sh wheels`).
#   bash bench/gpu_train_layouts.sh SHAPE RECOMPUTE MICRO_BATCH [ddp|fsdp|fsdp-offload] [SEQ_LENGTH]
#       [GLOBAL_BATCH] [ENGINE FLAGS ...]     (e.g. 16 --precision bf16: accumulate, autocast)
set -euo pipefail
source bench/gpu_stories.sh
case "$1" in  # vocab hidden ffn layers heads kv-heads
tinyllama-1.1b) shape=(32000 2048 5632 22 32 4) ;;
llama-3.2-3b)   shape=(128256 3072 8192 28 24 8) ;;
llama-3-8b)     shape=(128256 4096 14336 32 32 8) ;;
*) echo "unknown shape $1" >&2; exit 2 ;;
esac
seq=${5:-4096}
batch=${6:-$3}
dp=(--data-parallel "${4:-ddp}")
[ "${4:-}" = fsdp-offload ] && dp=(--data-parallel fsdp --cpu-offload)
flags=$(printf %s "${*:7}" | tr -cs 'a-zA-Z0-9.' '-')  # engine flags name the log too
log="${OUT:-/tmp}/train-$1-$2-mb$3-${4:-ddp}-seq$seq-gb$batch$flags.log"
rm -rf "$W/ckpt"
python3 -m engine pretrain --config bench/configs/gpu_layouts.yaml \
    --model.vocab-size "${shape[0]}" --model.hidden-size "${shape[1]}" \
    --model.intermediate-size "${shape[2]}" --model.num-layers "${shape[3]}" \
    --model.num-heads "${shape[4]}" --model.num-kv-heads "${shape[5]}" \
    --model.max-position-embeddings "$((seq > 4096 ? seq : 4096))" --data.seq-length "$seq" \
    --recompute "$2" --micro-batch-size "$3" \
    --global-batch-size "$batch" "${dp[@]}" "${@:7}" >"$log" 2>&1 &
job=$!
until grep -q "iter 12/12" "$log" || ! kill -0 "$job" 2>/dev/null; do sleep 1; done
# SIGKILL: SIGTERM would make the job save a checkpoint (requeue) while the next one starts
kill -9 "$job" 2>/dev/null || true
wait "$job" 2>/dev/null || true
grep -E "iter 12/12|Error|error" "$log" | tail -3
