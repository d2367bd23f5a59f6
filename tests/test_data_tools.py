"""Command-line tools of the data layer: show, and the throughput benchmark."""
import re
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = __file__.rsplit("/tests/", 1)[0]


def _run(*args):
  return subprocess.run([sys.executable, *args], check=True, cwd=ROOT,
                        capture_output=True, text=True).stdout


def test_show_writes_a_grid_of_examples(tmp_path):
  out = _run("-m", "rvlm.data.show", "--config=configs/base.py", "--split=val",
             "--num=8", f"--out={tmp_path}", "--cell=64")
  assert "wrote" in out and "8 examples" in out
  img = np.asarray(Image.open(tmp_path / "val.png"))
  assert img.shape[1] == 4 * 64 and img.shape[0] > 2 * 64
  assert len(np.unique(img.reshape(-1, 3), axis=0)) > 8   # images and text drawn


def test_throughput_benchmark_reports_a_ratio():
  out = _run("benchmarks/data_throughput.py", "--config=configs/base.py",
             "--workers=0", "--batches=4", "--warmup=1", "--consume_rate=100")
  rate, ratio = re.search(r"num_workers=0:\s+(\d+) examples/s =\s+([\d.]+)x", out).groups()
  assert float(rate) > 0 and abs(float(ratio) - float(rate) / 100) < 0.1
