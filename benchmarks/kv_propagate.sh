#!/usr/bin/env bash
# Auto mode with exact against propagated K/V on this machine (issue 15), in one command:
#
#   benchmarks/kv_propagate.sh [MODEL]          # default: the default model
#
# 1. calibrates propagated K/V (`calibrate --kv propagate`) into a temporary copy of the model's directory
#    (the model itself is not changed);
# 2. benches full depth, fixed depths, auto (exact) and auto:propagate on the model as it is (thresholds
#    calibrated for exact K/V), then on the copy (thresholds calibrated under propagation).
# Results go to $OUT (default benchmarks/results): calibrate-kv-propagate.txt, bench-kv-*.json/.png/.txt.
# Environment: DATA (held-out records, default ../shared/data/alpaca_1800.json, last $HOLDOUT=200 of them),
# MODES (bench rows besides hf and full, default depth:21,depth:24,depth:27,auto,auto:propagate: exits of
# the default model), PROMPTS (default benchmarks/prompts3.txt), REPEAT (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-}
out=${OUT:-benchmarks/results}
data=${DATA:-../shared/data/alpaca_1800.json}
modes=${MODES:-depth:21,depth:24,depth:27,auto,auto:propagate}
mkdir -p "$out"

# The model's own directory (for the default model: its cached merged copy).
dir=$(python - "$model" <<'EOF'
import sys
from sortedchat.cli import options as o
print(o.load_model(sys.argv[1] or None, o.LoadFlags().load_options()).weights_path)
EOF
)
copy=$(mktemp -d)/propagate
trap 'rm -rf "$(dirname "$copy")"' EXIT
cp -r "$dir" "$copy"

sortedchat calibrate --model "$copy" --data "$data" --holdout "${HOLDOUT:-200}" --measure subset --kv propagate \
  | tee "$out/calibrate-kv-propagate.txt"
for which in exact-thresholds propagate-thresholds; do
  target=(${model:+--model "$model"})
  [ "$which" = propagate-thresholds ] && target=(--model "$copy")
  sortedchat bench "${target[@]}" --prompts "${PROMPTS:-benchmarks/prompts3.txt}" --max-new-tokens 128 \
    --repeat "${REPEAT:-2}" --threads 1 --clock cpu --modes "$modes" \
    --json "$out/bench-kv-$which.json" --plot "$out/bench-kv-$which.png" | tee "$out/bench-kv-$which.txt"
done
