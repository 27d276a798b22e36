#!/usr/bin/env bash
# The engine alone on a GPU node: data stages, then pretraining with compiled blocks and the
# default numerics (bf16 weights, fp32 masters). Needs only torch and the engine's light deps.
set -euo pipefail
W=/tmp/lmforge-gpu
rm -rf "$W"
python3 -m engine generate-corpus --output "$W/corpus" --documents 20000 --shards 4 >/dev/null
python3 -m engine train-tokenizer --input "$W/corpus" --output "$W/tok" --vocab-size 512 >/dev/null
python3 -m engine tokenize --input "$W/corpus" --output-prefix "$W/ds/stories" \
    --tokenizer "$W/tok/tokenizer.model" --append-eod --workers 4 --no-progress >/dev/null
python3 -m engine pretrain --config "$(dirname "$0")/configs/gpu_smoke.yaml" | python3 -c \
    "import json,sys; m=json.load(sys.stdin); print({k: m['summary'][k] for k in ('iterations','loss','valid_loss','tokens_per_s','peak_memory_gib')})"
