"""tools/gpu_check.sh: its dry run executes every step of both entry points on the CPU;
a machine without CUDA stops at the first step in one line; a run whose process died
is not waited for; the time budget skips what would start too late."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tools.gpu_check import runner, smoke

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["preflight", "data", "bf16_compile", "train_fp16", "sigterm_resume",
         "resume_matches", "knn_cpu_bank", "two_processes", "knn_gpu_bank", "fp32_to_fp16",
         "gpu_backend", "linear_1_epoch", "unit_checks"]
BENCH = ["preflight", "data", "bench_synthetic", "bench_pipelines", "bench_compile"]


def run_check(out, *args):
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(["bash", "tools/gpu_check.sh", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def test_the_dry_run_executes_every_step_of_both_entry_points_on_the_cpu(tmp_path):
    result = run_check(tmp_path, "--dry-run")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted((r["entry"], r["step"]) for r in records) == sorted(
        [("smoke", name) for name in SMOKE] + [("bench", name) for name in BENCH])
    assert all(r["rc"] == 0 and r["dry_run"] for r in records), records
    for r in records:  # each step's line, printed as it ended
        assert f"{r['step']:<20} rc=0 " in result.stdout
    assert "== smoke: 13 of 13 steps passed" in result.stdout
    assert result.stdout.count(": pass in ") == len(smoke.DEFECTS)  # defects 1 to 7
    unit = next(r for r in records if r["step"] == "unit_checks")
    assert len(unit["details"]) == 5 and all(d.startswith("PASS") for d in unit["details"])
    steps = {r["step"]: r["figure"] for r in records}
    assert "final weights equal" in steps["resume_matches"]  # bit for bit on the CPU
    assert "images no decoder could read (replaced by another): 1" in steps["gpu_backend"]
    assert "sharded k-NN equals one process" in steps["two_processes"]
    assert "[dry run:" in steps["train_fp16"]  # what only a GPU runs is said
    # the benchmark's rows, each written to its JSON as it was measured
    synthetic = json.loads((tmp_path / "bench_synthetic.json").read_text())
    assert [(r["config"], r["input"]) for r in synthetic["results"]] == [
        ("authors", "synthetic"), ("foreach", "synthetic")]
    assert synthetic["torch"] == torch.__version__ and synthetic["device"] == "cpu"
    pipelines = json.loads((tmp_path / "bench_pipelines.json").read_text())["results"]
    assert [(r["config"], r["input"]) for r in pipelines] == [
        ("pil pipeline, 0 workers", "pipeline"), ("pil pipeline, 0 workers", "pipeline"),
        ("gpu pipeline, 0 workers", "pipeline"), ("authors", "loader"), ("ours", "gpu loader")]
    assert all(r["samples_per_s"] > 0 for r in synthetic["results"] + pipelines)
    assert "| foreach | synthetic |" in (tmp_path / "logs" / "bench_synthetic.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_the_check_stops_at_once_in_one_line(tmp_path):
    result = run_check(tmp_path, "smoke")
    assert result.returncode == 3
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("== smoke"), result.stdout
    assert "preflight" in lines[1] and "CUDA is not available" in lines[1]
    assert f"torch {torch.__version__}" in lines[1]


def test_a_run_whose_process_died_is_not_waited_for(tmp_path):
    """One rank fails at once: its partner, which would wait in a collective, gets TERM."""
    start = time.monotonic()
    ranks = runner.Ranks([["sh", "-c", "exit 7"], ["sleep", "60"]], [{}, {}], 120,
                         tmp_path / "log", {})
    assert ranks.wait() == 7
    assert time.monotonic() - start < 10


def test_a_step_past_the_budget_is_reported_as_skipped(tmp_path, capsys):
    check = runner.Check("smoke", tmp_path, dry=True)
    check.work.rmdir()  # the steps' scratch folder: none needed here
    check.deadline = time.monotonic() + 5
    assert not check.step("late", 30, lambda: (0, "ran"))
    record = json.loads((tmp_path / "results.jsonl").read_text())
    assert record["rc"] == "skipped" and record["step"] == "late"
    assert "late" in capsys.readouterr().out and "ran" not in record["figure"]
