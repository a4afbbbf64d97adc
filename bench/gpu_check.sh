#!/usr/bin/env bash
# The GPU paths of primekd on tiny random Llama models, within 8 minutes on one H100.
#
#   bench/gpu_check.sh [--device cuda|cpu] [--out DIR] [--json FILE] [--only STEP...]
#   bench/gpu_check.sh --pack     # here: .whl/ for the GPU image, its size, the run command
#
# On the lent GPU image (Python 3.12, torch, transformers, accelerate, peft, pyarrow, rich,
# typer, ... but no pydantic and no optuna) primekd runs from src/, uninstalled; what it
# imports that the image lacks (bench/gpu/wheels.txt) travels as cp312 manylinux wheels in
# .whl/, installed there with `pip install --no-index --no-deps --target /tmp/site` and
# PYTHONPATH=/tmp/site. No vLLM is needed. `make gpu-check-mirror` runs the same on CPU in an
# environment that mirrors the image (bench/gpu_mirror.sh).
# Writes OUT/gpu_check.json (rewritten after each step) and prints one JSON line at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# the tool's limit on what travels to the GPU machine: tracked and untracked-not-ignored
# files, shared/, and the carried paths
TRAVEL_LIMIT_MIB=64
# the check's own limit (the issue's 8 minutes); the printed run command sets a shorter one
LIMIT=${GPU_CHECK_LIMIT:-480}

# the wheel line and the install line of the device notes, for Python 3.12 on manylinux x86-64
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)
INSTALL='python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;'

pack() {
    rm -rf .whl
    mkdir -p .whl
    grep -v '^#' bench/gpu/wheels.txt | sed 's/ *#.*//' | grep . | xargs \
        "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" -d .whl \
        2> >(grep -v "is ignored: it is neither" >&2 || true)
    ls .whl/*.whl | sed 's|.*/||' | cut -d- -f1 | sort | uniq -d | grep . && {
        echo "error: two versions of one package in .whl/" >&2; exit 2; }
    "$PY" - "$TRAVEL_LIMIT_MIB" <<'PYEOF'
import os
import subprocess
import sys
from pathlib import Path

listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        capture_output=True, check=True).stdout.split(b"\0")
tree = sum(os.path.getsize(f) for f in listed if f and os.path.isfile(f))
extra = {name: sum(f.stat().st_size for f in Path(name).rglob("*") if f.is_file())
         for name in (".whl", "shared") if Path(name).is_dir()}
total = tree + sum(extra.values())
wheels = sorted(p.name for p in Path(".whl").glob("*.whl"))
print(f"packed .whl/: {len(wheels)} cp312 wheels, {extra['.whl'] / 2**20:.1f} MiB")
for wheel in wheels:
    print(f"  {wheel}")
print(f"what travels: working tree {tree / 2**20:.1f} MiB"
      + "".join(f" + {k} {v / 2**20:.1f} MiB" for k, v in extra.items())
      + f" = {total / 2**20:.1f} MiB (limit {sys.argv[1]} MiB)")
if total > int(sys.argv[1]) * 2**20:
    sys.exit("error: what travels is over the limit")
PYEOF
    cat <<EOF
On a session with a GPU (device tool): one call, about 4 minutes expected, the limit leaves a
rerun (of the failed steps alone: --only STEP ...) inside 15 minutes of device time:
  run(carry=[".whl"], timeout_s=420, command=
    '$INSTALL set -o pipefail; nvidia-smi -L; PYTHONUNBUFFERED=1 GPU_CHECK_LIMIT=400 bench/gpu_check.sh --out /tmp/gpu_check --json \$OUT/gpu_check.json 2>&1 | tee \$OUT/gpu_check.log')
EOF
}

if [[ "${1:-}" == "--pack" ]]; then
    pack
    exit 0
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false \
    TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 HF_HUB_OFFLINE=1
# SIGINT at the limit: the check records what ran and prints its JSON line before exiting
exec timeout --signal=INT --kill-after=30 "$LIMIT" "$PY" bench/gpu_check.py "$@"
