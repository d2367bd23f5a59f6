"""benchmarks/convert.py at a tiny shape: builds, imports, exports, checks, reports."""
import json
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="the oracle extra (torch, transformers) is not installed")
pytest.importorskip("transformers", reason="the oracle extra (transformers) is not installed")

ROOT = __file__.rsplit("/tests/", 1)[0]


def test_convert_benchmark_times_every_step(tmp_path):
  out = subprocess.run(
      [sys.executable, "benchmarks/convert.py", "--layers=2", "--hidden=64", "--heads=4",
       "--kv_heads=2", "--intermediate=96", "--vocab=300", "--dtype=bfloat16",
       "--max_shard_size=100KB", f"--dir={tmp_path / 'run'}", f"--json={tmp_path / 'f.json'}"],
      check=True, cwd=ROOT, capture_output=True, text=True).stdout
  for step in ("import", "export", "check"):
    assert re.search(rf"^{step}\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+0$", out, re.M), out
  assert re.search(r"check: decoder max \|rvlm - transformers\| = \S+", out), out
  figures = json.loads((tmp_path / "f.json").read_text())
  ckpt = figures["checkpoint"]
  assert ckpt["safetensors_files"] > 1 and ckpt["float32_bytes"] == 4 * ckpt["params"]
  assert ckpt["safetensors_bytes"] < ckpt["float32_bytes"]          # saved as bfloat16
  steps = figures["steps"]
  assert steps["import"]["workdir_params"] > ckpt["params"]        # + fresh ViT, projector
  assert steps["check"]["max_diffs"]["decoder"] < 1e-3
  assert all(s["peak_rss_bytes"] > 0 and s["seconds"] > 0 for s in steps.values())
