"""OpenMP's waiting policy on the quick preset's hf stages, PASSIVE (primekd's default)
against ACTIVE, side by side in one run.

primekd sets `OMP_WAIT_POLICY=PASSIVE` before torch starts, because spinning threads made
LoRA training up to 7x slower beside a busy process (`bench/stage_levers.py`). This bench
measures what that default costs on a machine with nothing else running, on the stages
`make demo` runs with the in-process hf engine: the bundled model's `teacher/none`
(generation) and `eval/base` (generation), each a real `primekd run --only` in a fresh run
directory. Rounds alternate the order (PASSIVE first, then ACTIVE first, ...) so that a
drift of the machine falls on both.

    python bench/wait_policy.py                 # 1 round: ~8 minutes on 2 free cores
    python bench/wait_policy.py --rounds 2 --stage eval/base

It prints each stage's wall time per policy, the ratio PASSIVE / ACTIVE (above 1: the
default is slower), the CPU model and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stage_levers import cpu_name  # bench/ is the script's directory

POLICIES = ("PASSIVE", "ACTIVE")
PRIMEKD = Path(sys.executable).with_name("primekd")


def run_stages(policy: str, stages: list[str], preset: str) -> dict[str, float]:
    """Each stage's wall time (from `run --json`) in a fresh run directory under `policy`."""
    env = {**os.environ, "OMP_WAIT_POLICY": policy, "OMP_NUM_THREADS":
           os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    with tempfile.TemporaryDirectory(prefix=f"wait-{policy.lower()}-") as out:
        command = [str(PRIMEKD), "run", "--preset", preset, "--out", out, "--json"]
        for stage in stages:
            command += ["--only", stage]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"wait_policy: {policy} run failed:\n{done.stderr[-2000:]}")
        summary = json.loads(done.stdout)
    return {s["name"]: s["wall_time_s"] for s in summary["stages"] if s["name"] in stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--stage", action="append", dest="stages",
                        help="a stage of the preset with no upstream (default: teacher/none "
                             "and eval/base)")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    stages = args.stages or ["teacher/none", "eval/base"]
    times: dict[str, dict[str, list[float]]] = {p: {s: [] for s in stages} for p in POLICIES}
    started = time.time()
    for round_ in range(args.rounds):
        for policy in POLICIES if round_ % 2 == 0 else POLICIES[::-1]:
            for stage, seconds in run_stages(policy, stages, args.preset).items():
                times[policy][stage].append(seconds)
                print(f"round {round_ + 1} {policy:7s} {stage:14s} {seconds:7.1f} s", flush=True)
    print(f"\n{cpu_name()}, {os.cpu_count()} cores, OMP_NUM_THREADS "
          f"{os.environ.get('OMP_NUM_THREADS', os.cpu_count())}, load average at the end "
          f"{os.getloadavg()[0]:.2f}, {time.time() - started:.0f} s in all")
    for stage in stages:
        passive, active = (sum(times[p][stage]) for p in POLICIES)
        print(f"{stage:14s} PASSIVE {passive:7.1f} s  ACTIVE {active:7.1f} s  "
              f"PASSIVE / ACTIVE {passive / active:.2f}x")


if __name__ == "__main__":
    main()
