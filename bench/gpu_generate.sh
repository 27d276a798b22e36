#!/usr/bin/env bash
# Generation throughput on the GPU machine (bench/generate.py), logs under $OUT.
# The image lacks pydantic and its kin: carry .whl/ (made here by `bench/gpu_generate.sh wheels`).
#   device run, carry [".whl"]:  bash bench/gpu_generate.sh run "--shape tinyllama-1.1b --backends ours hf"
set -euo pipefail
case "$1" in
wheels)
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
        pydantic pydantic-settings python-dotenv typing-inspection annotated-types \
        typing-extensions tqdm ;;
run)
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
    python3 -m bench.generate $2 2>&1 | tee -a "${OUT:-/tmp}/generate.log" ;;
esac
