#!/usr/bin/env bash
# The GPU paths of primekd on tiny random Llama models, within 8 minutes on one GPU.
#
#   bench/gpu_check.sh [--device cuda|cpu] [--out DIR] [--json FILE] [--only STEP...]
#   bench/gpu_check.sh --pack DIR     # where an index is reachable: wheels + tokenizer to carry
#   bench/gpu_check.sh --from DIR ... # on the GPU box: install DIR/wheels offline, use DIR/tokenizer
#
# The GPU box needs only torch, transformers, peft and accelerate: primekd runs from src/
# (no install), and its other imports (pyarrow, rich, typer) come from the packed wheels
# (58 MiB measured with pyarrow 26, tokenizer included; the limit is 64 MiB).
# Writes OUT/gpu_check.json: what passed, and the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CARRY=(pyarrow rich typer click shellingham markdown-it-py mdurl pygments)

if [[ "${1:-}" == "--pack" ]]; then
    dir=${2:?--pack DIR}
    mkdir -p "$dir/wheels" "$dir/tokenizer"
    # wheels for this Python; for another one on the GPU box set PACK_PYTHON_VERSION=3.12
    target=()
    [[ -n "${PACK_PYTHON_VERSION:-}" ]] && target=(--python-version "$PACK_PYTHON_VERSION"
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64)
    "$PY" -m pip download --quiet --only-binary=:all: --no-deps "${target[@]}" \
        -d "$dir/wheels" "${CARRY[@]}"
    "$PY" - "$dir/tokenizer" <<'PYEOF'
import sys
sys.path.insert(0, "src")
from primekd.core.models import load_tokenizer
load_tokenizer("smollm2-135m-instruct").save_pretrained(sys.argv[1])
PYEOF
    size=$(du -sm "$dir" | cut -f1)
    echo "packed $dir: ${size} MiB (limit 64)"
    [[ $size -le 64 ]] || { echo "error: $dir is over 64 MiB" >&2; exit 2; }
    exit 0
fi

args=()
while [[ $# -gt 0 ]]; do
    if [[ "$1" == "--from" ]]; then
        dir=${2:?--from DIR}
        missing=$("$PY" -c "import importlib.util as u; print(' '.join(m for m in
            ('pyarrow', 'rich', 'typer') if u.find_spec(m) is None))")
        if [[ -n "$missing" ]]; then
            "$PY" -m pip install --quiet --no-index --find-links "$dir/wheels" "${CARRY[@]}"
        fi
        [[ -d "$dir/tokenizer" ]] && args+=(--tokenizer "$dir/tokenizer")
        shift 2
    else
        args+=("$1")
        shift
    fi
done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false \
    TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 HF_HUB_OFFLINE=1
exec timeout 480 "$PY" bench/gpu_check.py "${args[@]}"
