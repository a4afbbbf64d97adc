"""`primekd run` end to end on the tiny model: every stage, every report section, a second run
that only reads the cache, a one-strategy change that reruns only what depends on it, and
the HTML report opened in headless Chromium."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from primekd.experiment.config import load_config
from primekd.experiment.runner import run_experiment

pytestmark = pytest.mark.slow

SECTIONS = ("Results in the paper's layout", "Results", "Teachers", "Training curves",
            "Worked examples", "Compute", "Attention heads", "Reproduce")
EXPERIMENTS = ("base", "sft", "kd-none", "kd-ground_truth", "op-ground_truth")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-dev-shm-usage")


def _config(model: Path) -> str:
    return f"""
name: tiny
models: {{teacher: {model}, student: {model}}}
data:
  transfer: {{split: train, sample: 6}}
  test: {{split: test, sample: 4}}
strategies: [none, ground_truth]
controls: [base, sft]
teacher: {{max_new_tokens: 8, batch_size: 6}}
distill: {{max_steps: 2, batch_size: 2, logging_steps: 1, val_size: 1, eval_steps: 1,
           save_steps: 1, max_length: 1024, lora_r: 2, lora_alpha: 4}}
eval: {{max_new_tokens: 8, batch_size: 4}}
attention: {{enabled: true, sample: 2, max_length: 48, heads_top: 1}}
on_policy: [{{strategy: ground_truth, rounds: 2, round_size: 2, rollout_max_new_tokens: 8}}]
report: {{examples: 1}}
"""


def _primekd(*args: str) -> dict:
    """The real CLI command, in this process (a new interpreter would only add import time)."""
    from typer.testing import CliRunner

    from primekd.cli import app

    result = CliRunner().invoke(app, ["run", *args, "--json"])
    assert result.exit_code == 0, f"{result.output[-3000:]}\n{result.exception!r}"
    summary = json.loads(result.stdout)  # the JSON alone: the stage lines go to stderr
    for stage in summary["stages"]:  # a long run's log says where it is
        assert f"] {stage['name']}" in result.stderr, result.stderr
    assert ("done in" in result.stderr) == any(s["ran"] for s in summary["stages"])
    return summary



@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    (root / "tiny.yaml").write_text(_config(tiny_model_dir))
    summary = _primekd(str(root / "tiny.yaml"), "--out", str(root / "run"))
    assert all(stage["ran"] and stage["state"] == "new" for stage in summary["stages"])
    return root / "run"


def test_every_stage_and_report_section(run_dir: Path) -> None:
    for name in ("none", "ground_truth"):
        assert (run_dir / "teacher" / name / "manifest.json").exists()
    for name in EXPERIMENTS:
        assert (run_dir / "eval" / name / "results.jsonl").exists()
        if name != "base":
            assert (run_dir / "students" / name / "adapter_config.json").exists()
    assert (run_dir / "attention" / "summary.json").exists()
    assert (run_dir / "config.yaml").exists()

    md = (run_dir / "report.md").read_text()
    headings = re.findall(r"^## (.+)$", md, flags=re.M)
    assert tuple(headings) == SECTIONS
    # the first paragraph's power statement, for the run's report.power_diff (default 8)
    assert "**Power.** The primary comparison, `kd-ground_truth` against `kd-none`" in md
    assert "to detect 8 points" in md.split("## ", 1)[0]
    paper = md.split("## Results in the paper's layout", 1)[1].split("## Results\n", 1)[0]
    assert "No distillation" in paper and "KD, `ground_truth` priming" in paper
    assert "relative gain vs KD without priming" in paper and "paired bootstrap" in paper
    results = md.split("## Results\n", 1)[1].split("## Teachers", 1)[0]
    for name in EXPERIMENTS:
        assert f"| `{name}` |" in results
    assert "95% CI (Wilson)" in results and "Δ vs kd-none" in results
    assert "Δ vs base" in results and "p (Holm)" in results and "rel. gain" in results
    assert "Small sample" in results
    teachers = md.split("## Teachers", 1)[1].split("## Training", 1)[0]
    assert "| `none` |" in teachers and "| `ground_truth` |" in teachers
    for name in ("sft", "kd-none", "kd-ground_truth", "op-ground_truth"):
        assert (run_dir / "report_files" / f"curves-{name}.png").stat().st_size > 1000
    assert (run_dir / "report_files" / "accuracy.png").stat().st_size > 1000
    examples = md.split("## Worked examples", 1)[1].split("## Compute", 1)[0]
    assert "**base**" in examples and "**kd-none**" in examples and "Reference answer" in examples
    compute = md.split("## Compute", 1)[1].split("## Attention", 1)[0]
    assert "`teacher/none`" in compute and "`eval/kd-ground_truth`" in compute
    assert "**total**" in compute
    assert "On-policy students" in compute and "| `op-ground_truth` | ground_truth |" in compute
    on_policy = json.loads((run_dir / "students" / "op-ground_truth" / "summary.json")
                           .read_text())["on_policy"]
    assert len(on_policy["rounds"]) == 2 and on_policy["lmbda"] == 1.0
    assert on_policy["strategy"] == "ground_truth" and on_policy["cost_s"]["rollout_s"] > 0
    assert (run_dir / "students" / "op-ground_truth" / "rounds" / "round-001" /
            "manifest.json").exists()
    attention = md.split("## Attention heads", 1)[1].split("## Reproduce", 1)[0]
    assert "attention/plots/" in attention
    reproduce = md.split("## Reproduce", 1)[1]
    assert "primekd run" in reproduce and "`transformers`" in reproduce
    assert "strategies:" in reproduce

    page = (run_dir / "report.html").read_text()
    assert "http://" not in page.replace("http://www.w3.org", "")
    assert not re.search(r'(src|href)="(?!data:|#|https?://)', page)  # nothing from disk
    assert page.count('src="data:image/png;base64,') >= 5


def test_second_run_is_all_cached(run_dir: Path) -> None:
    before = (run_dir / "report.html").stat().st_mtime_ns
    summary = _primekd(str(run_dir / "config.yaml"), "--out", str(run_dir))
    assert [s["state"] for s in summary["stages"]] == ["cached"] * len(summary["stages"])
    assert not any(s["ran"] for s in summary["stages"])
    assert (run_dir / "report.html").stat().st_mtime_ns == before


def test_one_strategy_change_reruns_only_its_stages(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = load_config(run_dir / "config.yaml", overrides=[
        "strategies.ground_truth.teacher.max_new_tokens=6",
        "attention.plots=false",  # attention reruns either way; its plots are slow
    ])
    summary = run_experiment(config, copy, progress=False)
    ran = {s.name for s in summary.stages if s.ran}
    assert ran == {"teacher/ground_truth", "students/kd-ground_truth", "eval/kd-ground_truth",
                   "attention", "report"}
    manifest = json.loads((copy / "teacher" / "ground_truth" / "manifest.json").read_text())
    assert manifest["generation"]["max_new_tokens"] == 6


def _chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        return binary
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is required in CI: apt-get install -y chromium")
    pytest.skip("chromium not installed (apt-get install -y chromium); required when CI=true")


_PROBE = """<script>
var violations = 0;
document.addEventListener('securitypolicyviolation', function () { violations += 1; });
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var results = document.getElementById('results');
  var table = results && results.nextElementSibling;
  while (table && table.tagName !== 'TABLE') { table = table.nextElementSibling; }
  document.body.setAttribute('data-probe', JSON.stringify({
    images: images.length,
    broken: images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length,
    tables: document.getElementsByTagName('table').length,
    results_rows: table ? table.tBodies[0].rows.length : -1,
    results_text: table ? table.innerText : '',
    headings: Array.prototype.map.call(document.querySelectorAll('h2'),
                                       function (h) { return h.textContent; }),
    violations: violations
  }));
});
</script>"""


def test_html_renders_in_chromium(run_dir: Path, tmp_path: Path) -> None:
    chromium = _chromium()
    page = (run_dir / "report.html").read_text()
    # The probe needs inline script, which the report's policy forbids; everything else in
    # the policy (no network, images only from data: URIs) stays in force.
    probed = page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
    probed = probed.replace("</body>", _PROBE + "\n</body>")
    probe_file = tmp_path / "probe.html"
    probe_file.write_text(probed)
    base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--virtual-time-budget=10000", "--dump-dom",
                          probe_file.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    match = re.search(r'data-probe="([^"]*)"', dom.stdout)
    assert match, dom.stdout[:2000]
    probe = json.loads(html.unescape(match.group(1)))
    assert probe["violations"] == 0
    assert probe["images"] >= 5 and probe["broken"] == 0
    assert probe["tables"] >= 4
    assert probe["results_rows"] == len(EXPERIMENTS)
    for name in EXPERIMENTS:
        assert name in probe["results_text"]
    assert tuple(probe["headings"]) == SECTIONS

    shot = tmp_path / "report.png"
    screenshot = subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,2400",
                                 (run_dir / "report.html").as_uri()],
                                capture_output=True, text=True, timeout=120)
    assert screenshot.returncode == 0, screenshot.stderr[-2000:]
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_sharded_teacher_stages_train_one_student(run_dir: Path, tmp_path: Path) -> None:
    """`teacher_shards: 2`: two teach stages (run here as `--only` would, one at a time), whose
    stores the student trains on together; the report merges the shards' manifests."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = load_config(run_dir / "config.yaml", overrides=[
        "teacher_shards=2", "strategies=[none]", "controls=[]", "attention.enabled=false",
        "on_policy=[]"])
    for shard in ("teacher/none/shard-1-of-2", "teacher/none/shard-0-of-2"):
        summary = run_experiment(config, copy, progress=False, only=[shard])
        assert [s.name for s in summary.stages if s.ran] == [shard]
    teacher = copy / "teacher" / "none"
    assert not (teacher / "manifest.json").exists()  # the unsharded store was cleared
    rows = [json.loads((teacher / f"shard-{i}-of-2" / "manifest.json").read_text())
            ["counts"]["rows"] for i in range(2)]
    assert rows == [3, 3]
    summary = run_experiment(config, copy, progress=False)
    assert {s.name for s in summary.stages if s.ran} == {
        "students/kd-none", "eval/kd-none", "report"}
    record = json.loads((copy / ".stages" / "students--kd-none.json").read_text())
    assert "shard-0-of-2" in json.dumps(record) and "shard-1-of-2" in json.dumps(record)
    teachers = (copy / "report.md").read_text().split("## Teachers", 1)[1].split("##", 1)[0]
    assert "| `none` |" in teachers and "6/6" in teachers
