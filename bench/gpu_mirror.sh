#!/usr/bin/env bash
# `make gpu-check-mirror`: bench/gpu_check.sh --device cpu in an environment that mirrors the
# lent GPU image, with the wheels that travel to it installed exactly as they are there.
#
#   1. .venv-gpumirror: the image's packages that primekd imports, at the image's versions
#      where PyPI has them for this Python (bench/gpu/mirror.txt says where not), and nothing
#      the image lacks: every installed distribution is checked against the image's list
#      (bench/gpu/image_packages.txt); no pydantic, no optuna, no vLLM.
#   2. the carried wheel set (bench/gpu/wheels.txt) resolved for cp312 manylinux into .whl/,
#      as `bench/gpu_check.sh --pack` makes it for the GPU, and the travelling tree measured;
#   3. the same versions for this Python (cp311 builds of the native ones: pydantic-core,
#      sqlalchemy) installed with the GPU's own line, `pip install --no-index --no-deps
#      --target SITE`, and put on PYTHONPATH as there;
#   4. bench/gpu_check.sh --device cpu in the mirror, which must pass.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MIRROR=${MIRROR:-.venv-gpumirror}
started=$(date +%s)
# this machine's pip configuration names local indexes that lack most packages: one warning each
unwarned() { grep -v "is ignored: it is neither" >&2 || true; }

"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
    echo "error: the mirror needs Python 3.11 (PYTHON=$PYTHON): its torch pin is the CPU wheel" \
        "at hand for cp311; for another Python pip would fetch torch's CUDA build" >&2; exit 2; }
if [[ ! -f $MIRROR/.installed || bench/gpu/mirror.txt -nt $MIRROR/.installed ]]; then
    rm -rf "$MIRROR"
    "$PYTHON" -m venv "$MIRROR"
    "$MIRROR/bin/pip" install --quiet --upgrade pip 2> >(unwarned)
    "$MIRROR/bin/pip" install --quiet -r bench/gpu/mirror.txt 2> >(unwarned)
    touch "$MIRROR/.installed"
fi
PY=$MIRROR/bin/python

# nothing the image lacks: every distribution in the mirror must be on the image's list
"$PY" - bench/gpu/image_packages.txt <<'PYEOF'
import re
import sys
from importlib import metadata


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


image = {norm(line.strip()) for line in open(sys.argv[1])
         if line.strip() and not line.startswith("#")}
installed = {norm(d.metadata["Name"]): d.version for d in metadata.distributions()}
extra = sorted(set(installed) - image)
if extra:
    sys.exit(f"error: the mirror holds what the GPU image lacks: {', '.join(extra)}")
for absent in ("pydantic", "optuna", "vllm"):
    if absent in installed:
        sys.exit(f"error: {absent} is installed in the mirror")
shown = ("torch", "transformers", "accelerate", "peft", "huggingface-hub", "tokenizers",
         "numpy", "pyarrow", "typer", "rich")
print("mirror: Python %s; %s; %d distributions, all on the image's list" % (
    sys.version.split()[0], ", ".join(f"{n} {installed[n]}" for n in shown), len(installed)))
PYEOF

# the wheels for the GPU (cp312 manylinux), and the size of what travels there
bench/gpu_check.sh --pack

# the same versions for this Python, installed as on the GPU
wheels=$MIRROR/wheels
site=$MIRROR/site
rm -rf "$wheels" "$site"
mkdir -p "$wheels"
grep -v '^#' bench/gpu/wheels.txt | grep . | sed 's/ *#.*//' | xargs \
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" \
    2> >(unwarned)
"$PY" - .whl "$wheels" <<'PYEOF'
import sys
from pathlib import Path


def versions(folder: str) -> set[tuple[str, str]]:
    return {tuple(w.name.split("-")[:2]) for w in Path(folder).glob("*.whl")}


gpu, here = versions(sys.argv[1]), versions(sys.argv[2])
if gpu != here:
    sys.exit(f"error: the cp312 and local wheel sets differ: {sorted(gpu ^ here)}")
print(f"carried wheels: the same {len(gpu)} name-version pairs for cp312 (.whl/) and here")
PYEOF
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$wheels"/*.whl

PYTHONPATH=$PWD/$site PYTHON=$PY bench/gpu_check.sh --device cpu --out "${OUT_DIR:-gpu_check_out/mirror}"
echo "gpu-check-mirror: passed in $(( $(date +%s) - started )) s"
