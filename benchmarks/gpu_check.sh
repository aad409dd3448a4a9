#!/usr/bin/env bash
# The GPU check of the CUDA path, one prepared script (nothing in the suite needs a GPU):
#   1. digits-cnn on every GPU of the machine through torchrun's agent (NCCL), bf16 autocast and
#      channels_last as `auto` chooses them there; its sharded test metrics must equal a
#      one-process `dlkit evaluate` of the saved weights (printed side by side);
#   2. benchmarks/gpu_speed.py (ResNet-20 images/s against the plain DataLoader loop, S0.1 epoch time).
# Needs a CUDA build of torch in PY's environment (constraints.txt pins the CPU wheel for laptops).
# Usage: PY=python OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-$(mktemp -d)}
gpus=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 1 ]; then echo '{"gpu_check": "skipped", "why": "no CUDA device"}'; exit 0; fi
$PY -m dlkit run digits-cnn --epochs 3 --device cuda --no-report --quiet --nproc "$gpus" --out "$OUT/nccl"
$PY - "$OUT/nccl" <<'PY'
import json, subprocess, sys
run = sys.argv[1]
summary = json.load(open(f"{run}/summary.json"))
again = json.loads(subprocess.run([sys.executable, "-m", "dlkit", "evaluate", run], capture_output=True, text=True,
                                  check=True).stdout)
keys = ("test_accuracy", "test_loss", "test_f1")
print(json.dumps({"gpu_check": "nccl_run", "precision": summary["precision"], "device": summary["device"],
                  "run": {k: summary[k] for k in keys}, "evaluate": {k: again[k] for k in keys},
                  "exact": all(summary[k] == again[k] for k in keys)}))
PY
$PY benchmarks/gpu_speed.py
