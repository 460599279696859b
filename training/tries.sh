#!/usr/bin/env bash
# Issue 11's five tries for the default model, all at one small budget so that they compare (the model card's
# "Why lenses alone, and what was tried" holds the results): the same 480 records (a seeded sample of the
# corpus build-default.sh writes), the same steps, batch and learning-rate schedule, held-out agreement on the
# first 50 held-out records every EVAL steps, then the card's evaluation (first 100 held-out records, up to
# 256 tokens) of each try and one plot of agreement at exits 21/24/27 against training tokens.
#   lens             lenses only, frozen model (the shipped method)
#   lens-seed1       the same with seed 1 (another data order): how much the figures move by chance
#   soft-lens        SoFT (LoRA) + lenses, KD from the cached top-64, last exit weighted 3 of 9.5
#   soft-kd          the same without lenses (KD-only SoFT, the last exit anchored to the teacher)
#   soft-lens-ld     soft-lens with LayerSkip layer dropout (rate rising with depth to 0.2)
#   soft-lens-last8  soft-lens with the last exit weighted 8 of 14.5
# Runs one after the other, one thread each; a try with a checkpoint resumes, a finished one is skipped.
# Usage: training/tries.sh [TRY ...]   (STEPS, BATCH, EVAL override the budget; OUT the folder)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-30} BATCH=${BATCH:-12} EVAL=${EVAL:-10} OUT=${OUT:-runs/tries}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

python - runs/data/train.jsonl runs/data/heldout.json "$OUT" <<'PY'
import json, random, sys
from pathlib import Path

train, heldout, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
rows = train.read_text(encoding="utf-8").splitlines()
random.Random(0).shuffle(rows)
(out / "train480.jsonl").write_text("\n".join(rows[:480]) + "\n", encoding="utf-8")
(out / "heldout50.json").write_text(json.dumps(json.loads(heldout.read_text(encoding="utf-8"))[:50], indent=1),
                                    encoding="utf-8")
PY

COMMON="--data $OUT/train480.jsonl --eval-data $OUT/heldout50.json --max-steps $STEPS --batch-size $BATCH
        --max-length 512 --eval-interval $EVAL --save-interval $EVAL --log-interval 2 --warmup-steps 2"
SOFT="--recipe training/recipes/smollm2-135m-soft-lens.toml"
declare -A ARGS=(
  [lens]="--recipe training/recipes/smollm2-135m-default.toml"
  [lens-seed1]="--recipe training/recipes/smollm2-135m-default.toml --seed 1"
  [soft-lens]="$SOFT"
  [soft-kd]="$SOFT --no-lenses"
  [soft-lens-ld]="$SOFT --layer-dropout 0.2"
  [soft-lens-last8]="$SOFT --exit-weights 0.5,0.5,1,1,1,1,1,8"
)
[ $# -gt 0 ] || set -- lens lens-seed1 soft-lens soft-kd soft-lens-ld soft-lens-last8
for t in "$@"; do
  [ -n "${ARGS[$t]:-}" ] || { echo "tries.sh: unknown try '$t' (known: ${!ARGS[*]})" >&2; exit 2; }
done
for t in "$@"; do
  [ -f "$OUT/$t/sortedchat.json" ] && continue
  resume=; [ -d "$OUT/$t/checkpoints" ] && resume=--resume
  sortedchat train ${ARGS[$t]} $COMMON --out "$OUT/$t" $resume
done
for t in "$@"; do
  sortedchat eval -m "$OUT/$t" --data runs/data/heldout.json --limit 100 --max-length 256 --json "$OUT/eval-$t.json"
done
python -m sortedchat.training.curves "${@/#/$OUT/}" --exits 21,24,27 --png "$OUT/tries.png"
