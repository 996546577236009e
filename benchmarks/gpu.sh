#!/usr/bin/env bash
# Issue 19 on a lent GPU, unattended: run from the repository root through the device tool, e.g.
#   run(command="bash benchmarks/gpu.sh", timeout_s=540)
# The device machine has no network: its python3 (/opt/torch/.venv) already holds torch with CUDA and
# the project's dependencies, so the project is installed without dependencies (never reinstalling
# torch), or put on PYTHONPATH if that fails. Results: $OUT/gpu_results.json (rewritten after every
# step, so a killed run still returns what it measured) and $OUT/gpu_log.txt.
# Environment: GPU_BUDGET_S (default 420: the script's own budget; it skips what no longer fits and
# still writes the JSON), GPU_ARGS (extra arguments for benchmarks/gpu.py), PYTHON (default python3),
# GPU_DEVICE (default cuda; cpu smoke-tests this wrapper where there is no GPU, e.g. with GPU_ARGS=--tiny-only).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET="${GPU_BUDGET_S:-420}"
DEVICE="${GPU_DEVICE:-cuda}"
LOG="$OUT/gpu_log.txt"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

{
  echo "== $(date -u +%FT%TZ) $(uname -m) $("$PY" --version 2>&1) at $(command -v "$PY")"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader 2>&1 | head -4
} | tee "$LOG"

if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$LOG"; then
  echo "ERROR: $PY's torch sees no CUDA device ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1));" \
       "nothing can be installed here (no network): run on a machine whose python has torch with CUDA" | tee -a "$LOG"
  exit 2
fi
missing=$("$PY" - <<'EOF' 2>&1
import importlib
names = ["transformers", "tokenizers", "safetensors", "einops", "numpy", "matplotlib", "PIL", "pandas", "tqdm"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "ERROR: missing Python packages on the device machine: $missing (carry them as wheels: see the device" \
       "tool's README)" | tee -a "$LOG"
  exit 2
fi
if ! (cd /tmp && "$PY" -c "import mech_vqa" 2>/dev/null); then
  "$PY" -m pip install --no-deps --no-build-isolation --no-index -q -e . >>"$LOG" 2>&1 \
    && echo "installed mech_vqa (editable, no dependencies)" | tee -a "$LOG" \
    || echo "pip install failed (see above); running from PYTHONPATH" | tee -a "$LOG"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code runs, whatever else is installed
"$PY" -c "import torch, transformers, mech_vqa; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'mech_vqa from', mech_vqa.__file__)" 2>&1 | tee -a "$LOG"

# SIGTERM 45 s after the budget if something hangs where the script's own alarm cannot reach (inside one
# long kernel): the script then writes what it has; SIGKILL 15 s later.
set -o pipefail
timeout -s TERM -k 15 $((BUDGET + 45)) "$PY" benchmarks/gpu.py --device "$DEVICE" --out "$OUT" --budget-s "$BUDGET" \
  ${GPU_ARGS:-} 2>&1 | tee -a "$LOG"
status=$?
echo "== gpu.py exit status $status; files in $OUT:" | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"
exit $status
