#!/usr/bin/env bash
# The one GPU check (its caps sum to 8.1 minutes of an H200 after its setup, 6.1 without the compiled-layer
# stage; runs end sooner when stages finish early): speed, then SmolLM2-135M + LoRA trained on
# the synthetic data, evaluated and ablated. Every stage has its own time cap (`timeout`); each stage's
# result line is printed as soon as it exists (and appended to $OUT/results.tsv), one table at the end,
# so a killed run still tells what it did.
#
#   bench_train      bench/train_step.py: the training step, layer stack vs transformers vs reference_compat (bf16)
#   bench_compiled   the same, the eager layer stack vs its layers compiled (`--compile_layers inductor`)
#   bench_decode     bench/decode.py: eager vs fast (static cache + CUDA graphs) vs reference_compat
#   data             codi data synth (the demo's 3-step chains, uniform wording)
#   base             the real SmolLM2-135M-Instruct weights (GGUF parts reassembled, de-quantised)
#                    (COMPILE_LAYERS=inductor: the training stages below compile their layers too)
#   train_codi       codi train --config configs/smollm2_synthetic.yaml (the paper's objective, beta 20)
#   train_cot_sft    the same budget, CoT-SFT;   train_no_cot_sft: No-CoT-SFT
#   eval_*           codi eval on the held-out split (CODI: latent and its teacher's CoT mode)
#   ablate           codi ablate on the CODI model: zero, shuffle, first_k
#
# Setup (the device has python3, torch, an older transformers and no network; one call carries 64 MiB):
#   here, once:   bash bench/gpu_check.sh prepare          # .whl/ (transformers, peft, regex) + .bench_assets/
#                 bash scripts/gpu_table1.sh split          # .bench_assets/gguf/part0..2 (31 MiB each)
#   device call 1, 2: bash scripts/gpu_table1.sh stage 0 (then 1)            carry .bench_assets/gguf/partN
#   device call 3:    bash scripts/gpu_table1.sh stage 2 && bash scripts/gpu_check.sh
#                     carry .whl, .bench_assets/smollm2, .bench_assets/gsm8k_aug_valid.txt, .bench_assets/gguf/part2
# (the three calls must reach the same warm machine). Without the parts the speed half still runs (random
# SmolLM2 weights: speed does not depend on them) and the training half says that the weights are missing.
# CPU smoke run: `bash scripts/gpu_check.sh --smoke` (tiny model, a few steps, --device cpu; a test runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/codi-gpu-check}
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
mkdir -p "$OUT"
W="$OUT/work"
RESULTS="$OUT/results.tsv"
: > "$RESULTS"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false CODI_BENCH_CACHE=${CODI_BENCH_CACHE:-/tmp/codi-bench-cache}
export CODI_GGUF_PARTS=${CODI_GGUF_PARTS:-$HOME/.cache/codi/smollm2-gguf-parts}
if [[ $SMOKE == 0 ]] && compgen -G ".whl/transformers-*.whl" > /dev/null; then  # the image's transformers lacks `cache=`
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
CODI=("$PY" -m codi.cli)

if [[ $SMOKE == 1 ]]; then
  DEVICE=cpu DTYPE=fp32 BENCH_MODEL=tiny STEPS=${STEPS:-3} QUICK=--quick CAP_SCALE=${CAP_SCALE:-4}
  SYNTH=(--n_train 48 --n_validation 4 --n_test 8)
  TRAIN=(--per_device_train_batch_size 4 --lora_r 8 --prj_dim 32)
  EVAL=(--device cpu --batch_size 8 --max_new_tokens 16)
else
  DEVICE=cuda DTYPE=bf16 BENCH_MODEL=smollm2 STEPS=${STEPS:-1000} QUICK= CAP_SCALE=${CAP_SCALE:-1}
  SYNTH=(--n_train 20000 --n_validation 50 --n_test 500)
  TRAIN=(--bf16 true)
  EVAL=(--device cuda --dtype bfloat16 --batch_size 250 --max_new_tokens 48)
  nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/env.txt" 2>&1
fi
"$PY" -c "import torch, transformers; print('versions', torch.__version__, transformers.__version__)" >> "$OUT/env.txt" 2>&1

summary() {  # one line from a stage's output
  "$PY" bench/check_summary.py "$1" "$OUT" 2>/dev/null || echo "(no summary)"
}

stage() {  # stage NAME CAP_S CMD...: run it under its cap (x CAP_SCALE); record and print its line at once
  local name=$1 cap=$(( $2 * CAP_SCALE )) start rc line
  shift 2
  start=$(date +%s)
  timeout "$cap" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  [[ $rc == 124 ]] && rc="timeout(${cap}s)"
  line="$(summary "$name")"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$line" >> "$RESULTS"
  echo "=== $name rc=$rc $(( $(date +%s) - start ))s: $line"
}

skip() {  # skip NAME REASON
  printf '%s\t%s\t0\t%s\n' "$1" "skipped" "$2" >> "$RESULTS"
  echo "=== $1 skipped: $2"
}

# --- speed (caps: 40 + 120 + 45 s; compiling takes most of bench_compiled's 120) ---
stage bench_train 40 "$PY" bench/train_step.py --model $BENCH_MODEL --device $DEVICE --dtype $DTYPE \
  --batch_size 32 --steps 3 --repeats 2 --variants default default_transformers reference_compat $QUICK \
  --output "$OUT/bench_train.json"
if [[ $SMOKE == 1 ]]; then  # inductor's CPU code generation takes minutes; tests/test_compiled_layer.py checks the graphs
  skip bench_compiled "CPU smoke run"
else  # its own stage: a compile failure costs this line only
  stage bench_compiled 120 "$PY" bench/train_step.py --model $BENCH_MODEL --device $DEVICE --dtype $DTYPE \
    --batch_size 32 --steps 3 --repeats 2 --variants default compiled --output "$OUT/bench_compiled.json"
fi
stage bench_decode 45 "$PY" bench/decode.py --model $BENCH_MODEL --device $DEVICE --dtype $DTYPE \
  --latency_questions 4 --batch_size 64 --repeats 2 $QUICK --output "$OUT/bench_decode.json" \
  --modes latent,latent_fast,latent_prompt_fast,latent_reference,cot,cot_fast

# --- SmolLM2-135M + LoRA on the synthetic data (caps: 10 + 25 + 90 + 45 + 35 + 25 + 15 + 10 + 25 s) ---
stage data 10 "${CODI[@]}" data synth --out "$W/data" --wording uniform --seed 0 "${SYNTH[@]}"
if [[ $SMOKE == 1 ]]; then
  stage base 25 "$PY" -c "from codi.testing import save_tiny_model; print(save_tiny_model('$W/base', arch='llama'))"
else
  stage base 25 "$PY" -c "import sys; sys.path.insert(0, 'bench'); from gpu_table1 import smollm2_base; print(smollm2_base(None))"
fi
BASE=$(tail -n 1 "$OUT/base.log" 2>/dev/null)
train() {  # train NAME CAP METHOD
  if [[ ! -f "$BASE/config.json" || ! -f "$W/data/train.txt" ]]; then
    skip "$1" "no base model or data (see base.log, data.log)"
    return
  fi
  stage "$1" "$2" "${CODI[@]}" train --config configs/smollm2_synthetic.yaml --method "$3" \
    --model_name_or_path "$BASE" --train_file "$W/data/train.txt" --validation_file "$W/data/validation.txt" \
    --eval_strategy no --save_strategy no --max_steps "$STEPS" --logging_steps 50 \
    --output_dir "$W/$3" "${TRAIN[@]}" ${COMPILE_LAYERS:+--compile_layers "$COMPILE_LAYERS"}
}
train train_codi 90 codi
train train_cot_sft 45 cot_sft
train train_no_cot_sft 35 no_cot_sft
evaluate() {  # evaluate NAME CAP METHOD EXTRA...
  local name=$1 cap=$2 method=$3
  shift 3
  if [[ ! -f "$W/$method/config.json" && ! -f "$W/$method/adapter_config.json" && ! -f "$W/$method/codi_config.json" ]]; then
    [[ -d "$W/$method" ]] || { skip "$name" "no $method model"; return; }
  fi
  stage "$name" "$cap" "${CODI[@]}" eval --model "$W/$method" --datasets gsm8k-aug --data_file "$W/data/test.txt" \
    --output_dir "$W/eval_$method" --no_progress true "${EVAL[@]}" "$@"
}
evaluate eval_codi 25 codi --compare_cot true
evaluate eval_cot_sft 15 cot_sft --mode cot
evaluate eval_no_cot_sft 10 no_cot_sft --mode cot
if [[ -d "$W/codi" ]]; then
  stage ablate 25 "${CODI[@]}" ablate --model "$W/codi" --data "$W/data/test.txt" --interventions zero,shuffle,first_k \
    --output_dir "$W/ablate" --no_progress true "${EVAL[@]}"
else
  skip ablate "no codi model"
fi

echo
echo "stage               rc        s  result"
while IFS=$'\t' read -r name rc seconds line; do
  printf '%-19s %-8s %4s  %s\n' "$name" "$rc" "$seconds" "$line"
done < "$RESULTS"
echo "(logs and JSON: $OUT)"
