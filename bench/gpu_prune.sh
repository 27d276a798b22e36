#!/usr/bin/env bash
# The prune stage on a TinyLlama-1.1B-shape checkpoint (random weights: the stage's time does
# not depend on them) with 1,024 calibration sequences of 2,048 tokens, by width (activation
# importance) and by depth (block importance), then the recovery finetune's training tokens/s
# with distillation from the parent and with plain CE (bench/configs/gpu_prune.yaml). Logs under
# $OUT. Carry .whl/py and .whl/bench (`bash bench/gpu_generate.sh wheels`).
#   bash bench/gpu_prune.sh
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/py/*.whl 2>/dev/null
export PYTHONPATH="/tmp/site:$PWD"
W=/tmp/lmforge-prune
O=${OUT:-/tmp}
tok=.whl/bench/tokenizer/tokenizer.json
if [ ! -d "$W/ds" ]; then
    python3 -m engine generate-corpus --output "$W/corpus" --documents 32000 --shards 8 >/dev/null
    python3 -m engine tokenize --input "$W/corpus" --output-prefix "$W/ds/stories" \
        --tokenizer "$tok" --append-eod --workers 8 --no-progress >/dev/null
fi
if [ ! -d "$W/parent" ]; then
    python3 - "$W/parent" "$tok" <<'PY'
import shutil, sys
from pathlib import Path
import torch
from engine.convert.native import write_native
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
cfg = ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                  num_heads=32, num_kv_heads=4, max_position_embeddings=2048)
with torch.device("cuda"):
    model = LlamaModel(cfg)
model.init_weights(0)
write_native(Path(sys.argv[1]), model.cpu(), cfg, {"stage": "bench"})
(Path(sys.argv[1]) / "tokenizer").mkdir()
shutil.copy(sys.argv[2], Path(sys.argv[1]) / "tokenizer")
PY
fi
prune() {  # NAME FLAGS...
    local name=$1; shift
    rm -rf "$W/$name"
    local start=$SECONDS
    python3 -m engine prune \
        --input "$W/parent" --output "$W/$name" --calibration "$W/ds/stories_text_document" \
        --seq-length 2048 --batch-size 8 --no-progress "$@" >"$O/prune-$name.log" 2>&1
    echo "$name: $((SECONDS - start)) s with the process start"; tail -2 "$O/prune-$name.log"
    python3 -c 'import json, sys; s = json.load(open(sys.argv[1]))["summary"]
print(sys.argv[2], s["parameters"], s["seconds"], s["calibration"])' \
        "$W/$name/manifest.json" "$name"
}
prune width --hidden-size 1536 --num-heads 24 --intermediate-size 4096
prune depth --num-layers 16
recover() {  # NAME FLAGS...
    local name=$1; shift
    rm -rf "$W/ckpt-$name"
    python3 -m engine finetune --config bench/configs/gpu_prune.yaml --load "$W/width" \
        --checkpoint.save "$W/ckpt-$name" "$@" >"$O/recover-$name.log" 2>&1 || true
    grep -E "iter 12/12|Error|error" "$O/recover-$name.log" | tail -2
}
recover kd --distill.teacher "$W/parent" --distill.alpha 0
recover ce
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
