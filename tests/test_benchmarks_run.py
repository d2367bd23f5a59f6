"""benchmarks/run.py: the summary's figures and goals, and the command end to end
(its cheapest section: timings themselves are never asserted)."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import run
from rvlm.utils import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _results(small_mfu=0.5, eager=1.5, decode_ratio=1.09):
  """A results.json-shaped dict with chosen figures (the goals' thresholds by default)."""
  train = {"small/float32": {"mfu": small_mfu}, "medium/float32": {"mfu": 0.79},
           "small/bfloat16": {"mfu": 0.2}}
  torch = {"small": {"eager": {"rvlm_ratio": eager}, "compile": {"rvlm_ratio": 0.9}},
           "medium": {"eager": {"rvlm_ratio": 1.2}, "compile": {"rvlm_ratio": 1.0}}}
  remat = {"small": {"scan/none": {"step_s": 2.0, "mfu": 0.3},
                     "scan/full": {"step_s": 1.0, "mfu": 0.6},
                     "loop/dots": {"step_s": 1.25, "mfu": 0.5}},
           "medium": {"scan/none": {"step_s": 3.0, "mfu": 0.4},
                      "loop/dots": {"step_s": 2.0, "mfu": 0.6}}}
  scaling = {"scan/R1": {"compile_s": 10.0, "step_s": 0.5},
             "scan/R8": {"compile_s": 16.0, "step_s": 3.5}}
  memory = {"step/R1": {"temp_bytes": 100}, "step/R8": {"temp_bytes": 250},
            "none/R1": {"temp_bytes": 100}, "none/R8": {"temp_bytes": 700}}
  return {"peak": {"n": 2048, "float32": 120.0, "bfloat16": 60.0}, "train": train,
          "torch": torch, "remat": remat, "scaling": scaling, "memory": memory,
          "pipeline": {"ratio": 4.9},
          "decode": {"small": {1: {"ratio_to_depth_x_r1": 1.0},
                               2: {"ratio_to_depth_x_r1": decode_ratio}},
                     "medium": {1: {"ratio_to_depth_x_r1": 1.0}, 2: {"ratio_to_depth_x_r1": 0.5}}}}


def test_summary_figures_are_ratios_of_the_results():
  s = run.summarise(_results())
  assert s["peak_gflops"] == {"float32": 120.0, "bfloat16": 60.0}
  assert s["mfu"] == {"small": 0.5, "medium": 0.79} and s["mfu_bf16"] == {"small": 0.2}
  assert s["torch_eager_ratio"] == {"small": 1.5, "medium": 1.2}
  assert s["torch_compile_ratio"] == {"small": 0.9, "medium": 1.0}
  assert s["fastest_remat_setting"] == {
      "small": {"setting": "scan/full", "mfu": 0.6, "speedup": 2.0},
      "medium": {"setting": "loop/dots", "mfu": 0.6, "speedup": 1.5}}
  assert s["compile_ratio_r8"] == pytest.approx(1.6) and s["step_ratio_r8"] == pytest.approx(7)
  assert s["memory_ratio_r8"] == pytest.approx(2.5)
  assert s["memory_ratio_r8_no_remat"] == pytest.approx(7)
  assert s["pipeline_ratio"] == 4.9
  assert s["decode_latency_ratio_by_depth"] == {"small": {"1": 1.0, "2": 1.09},
                                                "medium": {"1": 1.0, "2": 0.5}}


def test_goals_are_judged_at_their_thresholds():
  met = {g["goal"]: g["met"] for g in run.summarise(_results())["goals"]}
  assert met["small train step MFU >= 50% (f32, R = 3)"]           # 0.5: on the line
  assert not met["medium train step MFU >= 80% (f32, R = 3)"]      # 0.79
  assert met["small: rvlm / torch eager >= 1.5"] and met["medium: rvlm / torch eager >= 1.0"]
  assert not met["small: rvlm / torch.compile >= 1.0"]
  assert met["medium: rvlm / torch.compile >= 1.0"]
  assert not met["compile time R=8 / R=1 <= 1.5 (scan)"]            # 1.6
  assert not met["activation memory R=8 / R=1 <= 2 (recursion-level remat)"]  # 2.5
  assert not met["data pipeline >= 5x the trainer's consumption"]   # 4.9
  assert met["small: decode latency at depth 2 within 10% of 2 x depth 1's"]  # 1.09
  assert not met["medium: decode latency at depth 2 within 10% of 2 x depth 1's"]  # 0.5
  worse = {g["goal"]: g["met"] for g in run.summarise(
      _results(small_mfu=0.49, eager=1.49, decode_ratio=0.8))["goals"]}
  assert not worse["small train step MFU >= 50% (f32, R = 3)"]
  assert not worse["small: rvlm / torch eager >= 1.5"]
  assert not worse["small: decode latency at depth 2 within 10% of 2 x depth 1's"]  # too fast


def test_sections_left_out_leave_their_figures_and_goals_out():
  s = run.summarise({"peak": {"n": 8, "float32": 1.0, "bfloat16": 1.0}})
  assert set(s) == {"peak_gflops", "goals"} and s["goals"] == []


def _run(*args):
  return subprocess.run([sys.executable, "-m", "benchmarks.run", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, check=False)


def test_command_writes_the_summary_of_the_sections_it_ran(tmp_path):
  out = tmp_path / "bench"
  p = _run(f"--out={out}", "--quick", "--only=peak", "--peak_size=256")
  assert p.returncode == 0, p.stderr[-3000:]
  with open(out / "summary.json") as f:
    summary = json.load(f)
  assert summary["quick"] is True and summary["goals"] == []
  assert summary["peak_gflops"]["float32"] > 0 and summary["peak_gflops"]["bfloat16"] > 0
  assert summary["machine"]["cores"] >= 1
  assert set(summary["machine"]["isa"]) <= set(machine.ISA_FLAGS)
  assert f"({' '.join(summary['machine']['isa']) or 'ISA unknown'})" in p.stdout
  # The child inherits this process's environment, LD_PRELOAD included.
  assert summary["machine"]["malloc"] == machine.malloc_library()
  assert f"malloc {machine.malloc_library()} |" in p.stdout
  with open(out / "results.json") as f:
    assert json.load(f)["peak"]["n"] == 256
  assert "== peak" in p.stdout and "GFLOP/s (256x256 matmul)" in p.stdout


def test_command_rejects_unknown_sections_and_a_missing_out(tmp_path):
  p = _run(f"--out={tmp_path}", "--only=peak,warp")
  assert p.returncode != 0 and "unknown section(s) ['warp']" in p.stderr
  assert not os.listdir(tmp_path)
  p = _run("--only=peak")
  assert p.returncode != 0 and "--out=DIR is required" in p.stderr


def test_timed_stops_early_only_past_its_time_budget(monkeypatch):
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  clock = iter(range(100))  # every reading 1 "second" after the last: each call takes 1 s
  monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
  calls = []
  median, times = common.timed(lambda: calls.append(1), repeats=10, warmup=2, max_s=3)
  assert len(calls) == 2 + 3 and times == [1, 1, 1] and median == 1
  calls.clear()
  _, times = common.timed(lambda: calls.append(1), repeats=4, warmup=0)
  assert len(calls) == 4 and len(times) == 4
