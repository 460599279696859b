#!/usr/bin/env bash
# Rebuild the SoFT adapter that sortedchat ships as its default model (sortedchat/assets/smollm2-135m-soft):
#   1. train it with the recipe (skipped when RUN already holds a finished run),
#   2. copy the adapter into the package in float16 (half the size; the merge happens in float32),
#   3. calibrate the auto-mode thresholds on the held-out records (written into the shipped sortedchat.json).
# Usage: training/build-default.sh [RUN_DIR]   (default runs/smollm2-soft; the data sits beside the checkout)
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=training/recipes/smollm2-135m-alpaca.toml
RUN=${1:-runs/smollm2-soft}
DATA=${DATA:-../shared/data/alpaca_1800.json}
ASSET=sortedchat/assets/smollm2-135m-soft

[ -f "$RUN/sortedchat.json" ] || sortedchat train --recipe "$RECIPE" --data "$DATA" --out "$RUN"

python - "$RUN" "$ASSET" <<'EOF'
import json, shutil, sys
from pathlib import Path

from safetensors.torch import load_file, save_file

run, asset = Path(sys.argv[1]), Path(sys.argv[2])
asset.mkdir(parents=True, exist_ok=True)
state = load_file(str(run / "adapter_model.safetensors"))
save_file({k: v.half().contiguous() for k, v in state.items()}, str(asset / "adapter_model.safetensors"))
adapter_config = json.loads((run / "adapter_config.json").read_text())
# sortedchat resolves the base through sortedchat.json ("default"); PEFT users get the hub id, not our cache path.
adapter_config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
(asset / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
config = json.loads((run / "sortedchat.json").read_text())
config.update(thresholds={}, confidence="maxprob", calibration={})  # calibrated below
(asset / "sortedchat.json").write_text(json.dumps(config, indent=2) + "\n")
(asset / "exit_classifier.safetensors").unlink(missing_ok=True)
print(f"{asset}: adapter {(asset / 'adapter_model.safetensors').stat().st_size / 1e6:.1f} MB")
EOF

sortedchat calibrate --model "$ASSET" --data "$DATA" --holdout 200
