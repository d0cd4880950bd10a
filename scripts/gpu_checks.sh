#!/usr/bin/env bash
# All GPU checks and timings of dsgdbench in one command, run from the repository root:
#
#     bash scripts/gpu_checks.sh            # outputs in ${OUT:-gpu_out}/
#
# Stages (each with its own time limit; a failing stage does not stop the others, the exit
# code is non-zero if any failed; outputs are copied as soon as a stage ends, so a run cut
# short still leaves what it finished):
#   env    nvidia-smi, torch/CUDA versions                                  -> env.txt
#   tests  python -m pytest -m cuda -v (tests/test_gpu.py)                 -> pytest_cuda.log
#   speed  dsgdbench speed --device cuda (resnet18 32x32, 16 workers, local batch 64 and 512,
#          fp32/bf16, NCHW/channels-last; loop vs vmap vs single model; zhu2023-fig1
#          projection)                                                     -> speed.log, speed.md, speed.json
#   train  a short real run on synthetic CIFAR-shaped data (written as CIFAR-10 pickles into a
#          temporary --data-dir): resnet18, 16 workers, --device cuda --executor vmap
#          --precision bf16 --augment --channels-last                      -> train.log, train_results/
#
# Knobs (environment): STAGES="env tests speed train" (a subset to run), SPEED_ARGS (extra
# arguments of `dsgdbench speed`, e.g. "--batches 64 --repeats 5"), TRAIN_STEPS (default 60),
# TRAIN_MODEL (resnet18), TRAIN_WORKERS (16), TRAIN_BATCH (64),
# PYTHON (default python), DEVICE (default cuda; DEVICE=cpu smoke-tests this script on a
# machine without a GPU, with tiny SPEED_ARGS and TRAIN_*). Needs torch with CUDA; installs
# the package (pip install -e .) only if its dependencies are not importable.
#
# Time: about 2-4 min for tests, 3-5 min for speed (8 tables of 3 variants, 13 steps each;
# local batch 512 is total batch 8192), 1-2 min for train on an H100. Where one command may
# run at most 10 minutes, split it: STAGES="env tests train" and STAGES=speed.
set -u

OUT_DIR="${OUT:-gpu_out}"
PY="${PYTHON:-python}"
STAGES="${STAGES:-env tests speed train}"
TRAIN_STEPS="${TRAIN_STEPS:-60}"
TRAIN_MODEL="${TRAIN_MODEL:-resnet18}"
TRAIN_WORKERS="${TRAIN_WORKERS:-16}"
TRAIN_BATCH="${TRAIN_BATCH:-64}"
DEVICE="${DEVICE:-cuda}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dsgdbench_gpu.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export PY WORK DEVICE TRAIN_STEPS TRAIN_MODEL TRAIN_WORKERS TRAIN_BATCH  # for the stage functions
STATUS="$OUT_DIR/status.txt"
: > "$STATUS"
failed=0

stage() {  # stage NAME LIMIT_SECONDS LOGFILE COMMAND...
    local name="$1" limit="$2" log="$3"
    shift 3
    case " $STAGES " in *" $name "*) ;; *) echo "$name: skipped" >> "$STATUS"; return 0 ;; esac
    echo "=== $name: $*" | tee -a "$OUT_DIR/gpu_checks.log"
    local t0=$SECONDS
    if [ "$(type -t "$1")" = function ]; then  # a shell function of this script: run it in a child bash
        timeout --kill-after=20 "$limit" bash -c "$*" > "$OUT_DIR/$log" 2>&1
    else
        timeout --kill-after=20 "$limit" "$@" > "$OUT_DIR/$log" 2>&1
    fi
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - t0)) s (log: $log)" | tee -a "$STATUS" "$OUT_DIR/gpu_checks.log"
    tail -n 5 "$OUT_DIR/$log" | sed 's/^/    /' >> "$OUT_DIR/gpu_checks.log"
    if [ "$rc" -ne 0 ]; then failed=1; fi
    return 0
}

# ---------------------------------------------------------------------------- set-up
if ! "$PY" -c "import torch, typer, rich, pandas, scipy, sklearn, mnist1d, timm" > /dev/null 2>&1; then
    echo "installing the package and its dependencies (pip install -e .)" | tee -a "$OUT_DIR/gpu_checks.log"
    "$PY" -m pip install -q -e . >> "$OUT_DIR/gpu_checks.log" 2>&1 || echo "pip install failed" >> "$OUT_DIR/gpu_checks.log"
fi
if ! "$PY" -c "import pytest" > /dev/null 2>&1; then
    "$PY" -m pip install -q pytest >> "$OUT_DIR/gpu_checks.log" 2>&1 || true
fi
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to torch: nothing to check here" | tee -a "$STATUS"
    exit 1
fi

# ---------------------------------------------------------------------------- stages
env_info() {
    nvidia-smi || true
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name} {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
print("bf16 supported:", torch.cuda.is_bf16_supported())
EOF
    git rev-parse HEAD 2>/dev/null || true
    git status --short 2>/dev/null | head -40 || true
}
export -f env_info
stage env 120 env.txt env_info

stage tests 900 pytest_cuda.log "$PY" -m pytest -m cuda -v -rs -p no:cacheprovider tests/test_gpu.py

# shellcheck disable=SC2086
stage speed 1500 speed.log "$PY" -m dsgdbench speed --device "$DEVICE" --out "$OUT_DIR/speed.json" ${SPEED_ARGS:-}
if [ -f "$OUT_DIR/speed.json" ]; then
    "$PY" -c "import json, sys; from bench.speed import to_markdown; \
sys.stdout.write(to_markdown(json.load(open(sys.argv[1]))))" "$OUT_DIR/speed.json" > "$OUT_DIR/speed.md" || true
fi

make_fake_cifar() {  # CIFAR-10 in its python pickle format: 5 x 2000 training + 2000 test images
    "$PY" - "$WORK/data/cifar-10-batches-py" <<'EOF'
import os, pickle, sys
import numpy as np
root = sys.argv[1]
os.makedirs(root, exist_ok=True)
rng = np.random.default_rng(0)
proto = rng.integers(0, 256, (10, 3, 32, 32)).astype(np.float32)  # one pattern per class

def batch(n):
    y = rng.integers(0, 10, n)
    x = 0.5 * proto[y] + 0.5 * rng.integers(0, 256, (n, 3, 32, 32))
    return {"data": x.clip(0, 255).astype(np.uint8).reshape(n, -1), "labels": y.tolist()}

for i in range(1, 6):
    pickle.dump(batch(2000), open(os.path.join(root, f"data_batch_{i}"), "wb"))
pickle.dump(batch(2000), open(os.path.join(root, "test_batch"), "wb"))
print("wrote", root)
EOF
}

train_run() {
    make_fake_cifar || return 1
    "$PY" -m dsgdbench run --dataset cifar10 --data-dir "$WORK/data" --model "$TRAIN_MODEL" --algo dsgd \
        --topology ring --workers "$TRAIN_WORKERS" --batch "$TRAIN_BATCH" --steps "$TRAIN_STEPS" --eval-every $((TRAIN_STEPS / 2)) \
        --lr 0.1 --warmup 5 --device "$DEVICE" --executor vmap --precision bf16 --augment --channels-last \
        --hessian-samples 512 --results "$WORK/results" || return 1
    "$PY" - "$WORK/results" <<'EOF'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("*/summary.json")):
    s = json.loads(p.read_text())
    keys = ("run_id", "status", "executor", "device", "test_acc", "test_loss", "consensus_distance", "top_eig",
            "train_seconds", "eval_seconds", "steps")
    print(json.dumps({k: s.get(k) for k in keys}, indent=1))
    sps = s["steps"] / s["train_seconds"] if s.get("train_seconds") else None
    print(f"training steps/s ({s['model']}, vmap, bf16, augment, {s['workers']} x {s['batch']}): {sps:.2f}" if sps else "")
EOF
}
export -f make_fake_cifar train_run
stage train 900 train.log train_run
if [ -d "$WORK/results" ]; then
    mkdir -p "$OUT_DIR/train_results"
    for d in "$WORK"/results/*/; do
        [ -d "$d" ] || continue
        mkdir -p "$OUT_DIR/train_results/$(basename "$d")"
        cp "$d"/*.json "$d"/*.csv "$OUT_DIR/train_results/$(basename "$d")/" 2>/dev/null || true  # not model.pt
    done
fi

echo "outputs in $OUT_DIR:" && ls -la "$OUT_DIR" && cat "$STATUS"
exit "$failed"
