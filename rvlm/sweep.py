"""Runs named configs one after another in this process, resumably.

Each run is a plain `train.train_and_evaluate(config, workdir)`: the same trainer,
checkpoints and results.json as `rvlm.main`. A run whose workdir already holds
results.json and run_info.json is not retrained, so an interrupted sweep is resumed by
running the same command again (an unfinished run resumes from its checkpoint).

  runs = [sweep.Run("lr1e-3", config_a, "/tmp/sw/a"), sweep.Run("lr3e-3", config_b, ...)]
  records = sweep.run_all(runs)   # {name: {"results": ..., "info": ...}}
"""
import dataclasses
import json
import os
import time

import ml_collections
import numpy as np
from absl import logging

from rvlm import metrics
from rvlm import train

RESULTS, INFO = "results.json", "run_info.json"


@dataclasses.dataclass
class Run:
  name: str
  config: ml_collections.ConfigDict
  workdir: str


class SweepInterrupted(RuntimeError):
  """A run was stopped by a signal; its checkpoint is saved and a rerun resumes it."""


def read_metrics(workdir):
  """The rows of workdir/metrics.jsonl (the trainer's scalar log), oldest first."""
  path = os.path.join(workdir, "metrics.jsonl")
  return metrics.read_jsonl(path) if os.path.exists(path) else []


def _run_info(workdir, wall_time_s, resumed):
  rows = [r for r in read_metrics(workdir) if "loss" in r]
  last = rows[-1] if rows else {}
  speeds = [r["steps_per_sec"] for r in rows if "steps_per_sec" in r]
  return {
      "wall_time_s": wall_time_s,          # compile + train + final eval, this invocation
      "resumed": resumed,
      "steps_per_sec": float(np.median(speeds)) if speeds else None,
      "final_train_loss": last.get("loss"),
      "connector_alpha_final": last.get("connector/alpha_mean_abs"),
  }


def _write_json(path, obj):
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def run_one(run: Run):
  """Trains `run` unless already finished; returns {'results', 'info'}."""
  results_path = os.path.join(run.workdir, RESULTS)
  info_path = os.path.join(run.workdir, INFO)
  if os.path.exists(results_path) and os.path.exists(info_path):
    logging.info("sweep: %s already finished in %s", run.name, run.workdir)
  else:
    resumed = os.path.isdir(os.path.join(run.workdir, "checkpoints"))
    logging.info("sweep: training %s in %s%s", run.name, run.workdir,
                 " (resuming)" if resumed else "")
    start = time.time()
    payload = train.train_and_evaluate(run.config, run.workdir)
    if payload is None:
      raise SweepInterrupted(f"sweep: {run.name} was stopped by a signal; rerun the same "
                             "command to resume it")
    _write_json(info_path, _run_info(run.workdir, time.time() - start, resumed))
  with open(results_path) as f:
    results = json.load(f)
  with open(info_path) as f:
    info = json.load(f)
  return {"results": results, "info": info}


def run_all(runs):
  """Runs `runs` in order (a run may init_from an earlier one); {name: record}."""
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f"sweep: run names must be unique, got {names}")
  return {run.name: run_one(run) for run in runs}
