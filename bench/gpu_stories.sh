# Sourced by the GPU training benches: pydantic and its kin from .whl/py (the image lacks them;
# `bash bench/gpu_generate.sh wheels`), and a token dataset of generated stories in
# /tmp/lmforge-layouts/ds (made once per machine).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/py/*.whl 2>/dev/null
export PYTHONPATH="/tmp/site:$PWD"
W=/tmp/lmforge-layouts
if [ ! -d "$W/ds" ]; then
    python3 -m engine generate-corpus --output "$W/corpus" --documents 20000 --shards 4 >/dev/null
    python3 -m engine train-tokenizer --input "$W/corpus" --output "$W/tok" --vocab-size 512 >/dev/null
    python3 -m engine tokenize --input "$W/corpus" --output-prefix "$W/ds/stories" \
        --tokenizer "$W/tok/tokenizer.model" --append-eod --workers 8 --no-progress >/dev/null
fi
