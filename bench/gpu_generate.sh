#!/usr/bin/env bash
# Generation throughput on the GPU machine (bench/generate.py and the synthesize stage), logs under
# $OUT. The image lacks pydantic and its kin, datasketch and vLLM: `bash bench/gpu_generate.sh
# wheels` puts them under .whl/ here (.whl/py, .whl/bench: a tokenizer and two corpora; .whl/vllm: the
# four 46 MiB parts of ../shared/tools/vllm-bundle). Then device runs back to back (a held machine
# keeps /tmp), each carrying [".whl/py", ".whl/bench"] and at most one part (64 MiB a run):
#   bash bench/gpu_generate.sh part        carry + .whl/vllm/part_aa (part_ad: + setup.sh, zstandard)
#   bash bench/gpu_generate.sh run "--shape tinyllama-1.1b --backends ours hf vllm"
#   bash bench/gpu_generate.sh stage vllm tinyllama-1.1b      (or engine: the synthesize stage)
#   bash bench/gpu_generate.sh stage vllm llama-3-8b 2 1      2 data-parallel engines of TP 1
#   bash bench/gpu_generate.sh stage vllm llama-3-8b 1 2      1 engine at tensor parallel 2
#   bash bench/gpu_generate.sh extend [--dtype bfloat16]       (bench/extend_vllm.py)
set -euo pipefail
shared=${SHARED:-../shared}
case "$1" in
wheels)
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl/py \
        pydantic pydantic-settings python-dotenv typing-inspection annotated-types \
        typing-extensions tqdm
    python3 -m pip download -q --no-deps -d .whl/py datasketch
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 -d .whl/py torchao==0.18.0
    bash "$shared/tools/vllm-bundle/bundle.sh" "$shared/tools/vllm-bundle/gpu-image-packages.txt" \
        "$PWD/.whl/vllm"
    mkdir -p .whl/bench/tokenizer .whl/bench/tokenizer-128k
    cp "$shared"/data/tokenizers/llama2/tokenizer* .whl/bench/tokenizer/
    # Llama-3's 128,256 ids for the 8B teacher: Llama-2's BPE with 96,256 more vocabulary entries
    # that no merge reaches (random weights emit them; they decode as their names)
    python3 -c 'import json, sys; t = json.load(open(sys.argv[1])); v = t["model"]["vocab"]
v.update({f"<r{i}>": i for i in range(len(v), 128256)})
json.dump(t, open(sys.argv[2], "w"), ensure_ascii=False, separators=(",", ":"))' \
        .whl/bench/tokenizer/tokenizer.json .whl/bench/tokenizer-128k/tokenizer.json
    cp .whl/bench/tokenizer/tokenizer_config.json .whl/bench/tokenizer-128k/
    # 1,024 documents of 1,100 characters (~250 Llama-2 tokens) from Moby-Dick
    python3 -c 'import json, sys; t = open(sys.argv[1]).read().split()
text = " ".join(t); docs = [text[i * 1100:(i + 1) * 1100] for i in range(1024)]
assert len(docs[-1]) == 1100
open(".whl/bench/corpus.jsonl", "w").writelines(json.dumps({"text": d}) + "\n" for d in docs)' \
        "$shared/data/text/gutenberg/pg2701.txt"
    # every real text of ../shared/data (books, WikiText-2, LAMBADA, FOMC statements; ~2.0M
    # Llama-2 tokens) in documents of 8,000 characters, for loss curves that see no text twice
    python3 -c 'import json, sys
texts = [json.loads(line)["text"] if f.endswith(".jsonl") else line
         for f in sys.argv[1:] for line in (open(f) if f.endswith(".jsonl") else [open(f).read()])]
docs = [t[i:i + 8000] for t in texts for i in range(0, len(t), 8000)]
open(".whl/bench/text.jsonl", "w").writelines(json.dumps({"text": d}) + "\n" for d in docs)' \
        "$shared"/data/text/{gutenberg/*.txt,wikitext-2-raw/*.txt,lambada/*.jsonl,finance/*.jsonl} ;;
part)
    mkdir -p /tmp/parts
    cp .whl/vllm/* /tmp/parts/ ;;
run|stage|extend)
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/py/*.whl 2>/dev/null
    if [ -f /tmp/parts/part_ad ] && [ ! -d /tmp/site/vllm ]; then bash /tmp/parts/setup.sh; fi
    export PYTHONPATH="/tmp/site:$PWD" VLLM_NO_USAGE_STATS=1
    log="${OUT:-/tmp}/generate.log"
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee -a "$log"
    if [ "$1" = extend ]; then
        python3 -m bench.extend_vllm ${2:-} 2>&1 | tee -a "${OUT:-/tmp}/extend_vllm.log"
    elif [ "$1" = run ]; then
        python3 -m bench.generate $2 2>&1 | tee -a "$log"
    else  # stage BACKEND SHAPE: 1,024 documents, 128-token prefixes, 512 new tokens each
        teacher=/tmp/teacher-$3
        tokenizer=.whl/bench/tokenizer
        [ "$3" = tinyllama-1.1b ] || tokenizer=.whl/bench/tokenizer-128k  # carry it then
        [ -d "$teacher" ] || python3 -m bench.generate --shape "$3" --save-teacher "$teacher" \
            --tokenizer "$tokenizer"
        ranks=${4:-1}
        rm -rf "/tmp/synth-$2-$3"
        for ((r = 0; r < ranks; r++)); do  # data-parallel engines: RANK of WORLD_SIZE each
            RANK=$r LOCAL_RANK=$r WORLD_SIZE=$ranks python3 -m engine synthesize \
                --input .whl/bench/corpus.jsonl --teacher "$teacher" --output "/tmp/synth-$2-$3" \
                --backend "$2" --tensor-parallel-size "${5:-1}" --sampling.max-tokens 512 \
                --sampling.ignore-eos --no-progress 2>&1 | tee -a "$log" &
        done
        wait
        python3 -c 'import json, sys; m = json.load(open(sys.argv[1]))
s = m["summary"]; print(json.dumps({"stage": sys.argv[2], "shape": sys.argv[3],
"generated_tokens": s["generated_tokens"], **s["throughput"]}))' \
            "/tmp/synth-$2-$3/manifest.json" "$2" "$3" | tee -a "$log"
    fi ;;
esac
