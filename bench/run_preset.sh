#!/usr/bin/env bash
# Run a preset (default `small`, issue 14) from a clean clone and publish its report in the
# repository, under docs/results/<preset>/, with the commit it came from and the machine.
#
#   bench/run_preset.sh                 # clone HEAD into a temp dir, set up, run, publish
#   bench/run_preset.sh --here          # run in this checkout (must be clean), then publish
#   PRESET=small-onpolicy bench/run_preset.sh               # another preset
#   RUN_SMALL_SET="eval.batch_size=32" bench/run_preset.sh  # extra --set overrides (recorded)
#   WORK=/work/runs/pair-clone PRESET=pair bench/run_preset.sh  # a fixed clone: rerun the same
#                                       # line after an interruption and it resumes there
#   UPGRADE=1 WORK=... PRESET=pair bench/run_preset.sh  # move that clone to this checkout's
#                                       # HEAD first (a fix found mid-run): finished stages
#                                       # whose settings are unchanged stay cached; RUN.txt
#                                       # lists every commit the run ran at, and since when
#
# A run that spans interruptions (the pair preset: about 5 hours) records the stages' summed
# wall time (each stage's record adds up its attempts, a killed one up to its last minute)
# as run_seconds, and the wall time of this last invocation beside it. Presets whose models
# are fetched (`make models`) fetch them first; a verified file is not fetched again.
#
# The run directory is kept (runs/<preset> in the clone; its path is printed): a rerun of this
# script with --here on the same checkout is served from the stage cache. Nothing is
# committed: review docs/results/<preset>/ and commit it yourself. Training uses 2 threads
# (OMP_NUM_THREADS=2, measured 1.34x over 1 on 2 cores): run it on cores nothing else uses.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
here=false
preset=${PRESET:-small}
[[ "${1:-}" == "--here" ]] && here=true
if [[ -z "${WORK:-}" || ! -d "${WORK:-}/.git" ]] && \
        [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
    echo "run_preset: the checkout has uncommitted changes; commit them first (the report" \
         "names the commit it came from)" >&2
    exit 2
fi
commit=$(git rev-parse HEAD)
if $here; then
    work=$repo
elif [[ -n "${WORK:-}" && -d "$WORK/.git" ]]; then
    # resume: the run stays on the commit it started from (its stage cache in
    # $WORK/runs/$preset skips what finished), whatever this checkout has moved on to
    if [[ -n "${UPGRADE:-}" && "$(git -C "$WORK" rev-parse HEAD)" != "$commit" ]]; then
        git -C "$WORK" fetch --quiet "$repo" "$commit"
        git -C "$WORK" checkout --quiet "$commit"
        echo "run_preset: moved the run in $WORK to commit ${commit:0:7}" >&2
    elif [[ "$(git -C "$WORK" rev-parse HEAD)" != "$commit" ]]; then
        commit=$(git -C "$WORK" rev-parse HEAD)
        echo "run_preset: resuming the run of commit ${commit:0:7} in $WORK (this checkout" \
             "is at $(git rev-parse --short HEAD)); remove $WORK to start over" >&2
    fi
    work=$WORK
else
    work=${WORK:-$(mktemp -d "/tmp/primekd-$preset.XXXXXX")/primekd}
    git clone --quiet --no-hardlinks "$repo" "$work"
    git -C "$work" checkout --quiet "$commit"
fi
cd "$work"
# the first start of this run (a resumed run keeps it), in the clone's ignored runs/
mkdir -p runs  # a fresh clone has none (runs/ is ignored)
[[ -f runs/.started_utc ]] || date -u +%Y-%m-%dT%H:%M:%SZ > runs/.started_utc
started=$(cat runs/.started_utc)
# every commit the run has run at, from when (a run moved with UPGRADE=1 has several)
[[ "$(tail -n1 runs/.commits 2>/dev/null | cut -d' ' -f2)" == "$commit" ]] || \
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) $commit" >> runs/.commits
setup_s=$SECONDS
make setup
if .venv/bin/primekd run --preset "$preset" --print-config | grep -q "qwen2.5-coder"; then
    make models
fi
setup_s=$((SECONDS - setup_s))
sets=()
for item in ${RUN_SMALL_SET:-}; do sets+=(--set "$item"); done
run_s=$SECONDS
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} .venv/bin/primekd run --preset "$preset" --out "runs/$preset" \
    "${sets[@]}" --json > "runs/$preset-summary.json"
run_s=$((SECONDS - run_s))
rerun_s=$SECONDS
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} .venv/bin/primekd run --preset "$preset" --out "runs/$preset" \
    "${sets[@]}" --json > "runs/$preset-rerun.json"
rerun_s=$((SECONDS - rerun_s))

dest=$repo/docs/results/$preset
rm -rf "$dest"
mkdir -p "$dest"
cp "runs/$preset"/{report.md,report.html,config.yaml} "$dest/"
cp -r "runs/$preset/report_files" "$dest/"
# report.md also links the attention plots and the head ranking
mkdir -p "$dest/attention"
cp -r "runs/$preset/attention/plots" "runs/$preset/attention/head_ranking.csv" "$dest/attention/"
cp "runs/$preset-summary.json" "$dest/run-summary.json"
{
    echo "preset: $preset"
    echo "commit: $commit"
    echo "commits_run_at: # since (UTC), commit; the stages finished before a move kept theirs"
    sed 's/^/  - /' runs/.commits
    echo "started_utc: $started"
    echo "setup_seconds: $setup_s"
    echo "run_seconds: $(.venv/bin/python -c 'import json, pathlib, sys; print(round(sum(json.loads(p.read_text())["wall_time_s"] for p in pathlib.Path(sys.argv[1]).glob("*.json"))))' "runs/$preset/.stages")"
    echo "last_invocation_seconds: $run_s"
    echo "cached_rerun_seconds: $rerun_s"
    echo "overrides: ${RUN_SMALL_SET:-none}"
    echo "clean_clone: $([[ $here == true ]] && echo no || echo yes)"
    echo "machine:"
    echo "  cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    echo "  cores_available: $(nproc)"
    echo "  memory: $(free -g | awk '/Mem:/ {print $2 " GiB"}')"
    echo "  load_average_at_end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "  kernel: $(uname -sr)"
    echo "  python: $(.venv/bin/python -V 2>&1)"
    echo "  omp_num_threads: ${OMP_NUM_THREADS:-2}"
    echo "  vllm_cpu_num_of_reserved_cpu: ${VLLM_CPU_NUM_OF_RESERVED_CPU:-unset: primekd sets 0 on at most 4 cores}"
} > "$dest/RUN.txt"
echo "run_preset: published to $dest (run ${run_s}s, cached rerun ${rerun_s}s); the run" \
     "directory is $work/runs/$preset"
