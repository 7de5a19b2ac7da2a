#!/usr/bin/env bash
# The GPU readiness check (issue 18 item 7): the one script a session with a GPU runs, from the
# repository root, e.g. through the device tool:  bash benchmarks/gpu_check.sh
#
# No network there and nothing installed: it uses the torch, transformers, peft and accelerate it
# finds (ray and lm-eval may be missing; the tests that need them skip). Each step has its own
# timeout (270 + 150 + 120 s: within one 600 s device call), so one hang does not eat the rest; a
# failed step is recorded and the next one runs. Everything lands in $OUT (default
# /tmp/gpu-check-out): environment.txt (versions, nvidia-smi), steps.txt (each step's exit status
# and time), per step NAME.out and NAME.err, the tests' JUnit XML and each benchmark's JSON.
# Exit status: the number of failed steps.
set -u
OUT="${OUT:-/tmp/gpu-check-out}"
mkdir -p "$OUT"
: >"$OUT/steps.txt"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a timeout into $OUT/NAME.out and .err, record the status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/steps.txt"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
    return 0
}

{
    date -u
    git rev-parse HEAD 2>/dev/null || echo "not a git checkout"
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.memory --format=csv
    nvidia-smi
    "$PYTHON" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
for name in ("transformers", "peft", "accelerate", "safetensors", "pydantic", "httpx", "sklearn", "fastapi", "uvicorn", "triton", "ray", "lm_eval"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except ImportError as exc:
        print(name, "MISSING", exc)
EOF
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

# The CUDA-marked tests (tests/test_cuda.py): every merge method in every tier, the worker, every
# fitness, the memory check and the tiers' peaks, on the GPU in bfloat16 against the CPU in float32.
step pytest_cuda 270 "$PYTHON" -m pytest -q -rs -m cuda -p no:cacheprovider --junitxml="$OUT/pytest_cuda.xml" tests/test_cuda.py

# In-place candidate vs merge + save + reload, and the in-place merge against the device's copy
# floor (targets on a GPU: speedup >= 10, floor_ratio <= 2).
step materialize_lm 150 "$PYTHON" benchmarks/materialize_lm.py --json --device cuda --dtype bfloat16
tail -n 1 "$OUT/materialize_lm.out" >"$OUT/materialize_lm.json"

# Each memory tier on the GPU: merge time against its floor, device peak against the estimate.
step memory_tiers 120 "$PYTHON" benchmarks/memory_tiers.py --json --device cuda
tail -n 1 "$OUT/memory_tiers.out" >"$OUT/memory_tiers.json"

exit "$failed"
