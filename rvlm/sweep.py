"""Config sweeps: a grid or a list of overrides, expanded into named, resumable runs.

  python -m rvlm.sweep --sweep=configs/sweeps/debug_2x2.py --out=/tmp/rvlm_sweep
      [--dry_run] [--launcher=local|tpu|slurm] [--launcher_args="..."] [--aggregate_only]

A sweep file defines `get_sweep()` returning a dict:

  config   the config file every run starts from, as `--config=` takes it (relative to
           the repository root, optionally with ':arg', e.g. 'configs/base.py:preset=tiny')
  base     {field: value} overrides shared by every run (optional; not in run names)
  grid     {field: [value, ...]}: one run per point of the product (optional)
  runs     [{field: value, ...}, ...]: one run per entry (optional); with a grid as well,
           every entry is combined with every grid point (an entry and the grid must not
           set the same field)
  name     a function {field: value} -> run name, called with a run's own overrides
           (grid point and runs entry, not base); optional

Fields are dotted config paths ('optim.lr', 'model.recursion.num_steps'); a run's own
values win over `base`. Without `name`, a run is named by its own overrides in order:
'lr=0.001,num_steps=1' (each field by its last path component unless two fields share
it; characters other than letters, digits and '._+=-' become '_'). Names must be unique.
Every run's config is built exactly as `python -m rvlm.main --config=FILE
--config.FIELD=VALUE ...` builds it (ml_collections config_flags) and checked with the
trainer's own check_config before anything runs (rvlm/sweep_plan.py): an unknown field,
a wrong type or an incompatible combination (recursion mode 'none' with R > 1) fails
the sweep up front.

Launchers: `local` (default) trains the runs one after another in this process, each in
OUT/runs/<name>/ (an ordinary rvlm workdir); a run holding results.json and run_info.json
is not retrained, so rerunning the command resumes the sweep. With --dry_run it prints
each run and the command that trains it standalone, and trains nothing. `tpu` and
`slurm` only print, one command per run, for launch/tpu/tpu.sh and
launch/slurm/submit.sh, with --launcher_args passed through (TPU name, zone, ...); OUT may
then be a gs:// path. Printed commands are shell-quoted and run from the repository root;
the output is itself a shell script.

After the local runs, or with --aggregate_only (runs trained elsewhere, their workdirs
copied back under OUT/runs/), each run's results.json (+ run_info.json when present,
else its metrics.jsonl) is gathered into OUT/sweep.md and OUT/sweep.csv, one row per
run, runs without results marked as such; the markdown table is printed.

The library side runs named configs resumably (rvlm/experiments/ use it):

  runs = [sweep.Run("lr1e-3", config_a, "/tmp/sw/a"), sweep.Run("lr3e-3", config_b, ...)]
  records = sweep.run_all(runs)   # {name: {"results": ..., "info": ...}}
"""
import csv
import dataclasses
import io
import json
import os
import shlex
import time

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np

from rvlm import metrics
from rvlm import train
from rvlm.sweep_plan import LAUNCHERS, SweepError
from rvlm.sweep_plan import load_sweep_file, overrides_text, plan, run_workdir, script
from rvlm.utils import cli

RESULTS, INFO = "results.json", "run_info.json"
TABLE_MD, TABLE_CSV = "sweep.md", "sweep.csv"


@dataclasses.dataclass
class Run:
  name: str
  config: ml_collections.ConfigDict
  workdir: str


class SweepInterrupted(RuntimeError):
  """A run was stopped by a signal; its checkpoint is saved and a rerun resumes it."""


# ---- resumable runs ----------------------------------------------------------------


def read_metrics(workdir):
  """The rows of workdir/metrics.jsonl (the trainer's scalar log), oldest first."""
  path = os.path.join(workdir, "metrics.jsonl")
  return metrics.read_jsonl(path) if os.path.exists(path) else []


def train_summary(workdir):
  """From the training log: median steps/s of the logged windows, the last logged train
  loss and connector |alpha| (None where the log has none), and the last logged step."""
  rows = [r for r in read_metrics(workdir) if "loss" in r]
  last = rows[-1] if rows else {}
  speeds = [r["steps_per_sec"] for r in rows if "steps_per_sec" in r]
  return {
      "steps_per_sec": float(np.median(speeds)) if speeds else None,
      "final_train_loss": last.get("loss"),
      "connector_alpha_final": last.get("connector/alpha_mean_abs"),
      "last_step": last.get("step"),
  }


def _run_info(workdir, wall_time_s, resumed):
  summary = train_summary(workdir)
  return {
      "wall_time_s": wall_time_s,          # compile + train + final eval, this invocation
      "resumed": resumed,
      "steps_per_sec": summary["steps_per_sec"],
      "final_train_loss": summary["final_train_loss"],
      "connector_alpha_final": summary["connector_alpha_final"],
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


# ---- the table ---------------------------------------------------------------------


def _row(p, workdir):
  """One run's table row: None where the run recorded no such value."""
  row = {"run": p.name, "overrides": overrides_text(p, p.varied)}
  summary = train_summary(workdir)
  # An unfinished run's train log still tells how far and how fast it got.
  row.update({k: summary[k] for k in ("final_train_loss", "steps_per_sec",
                                      "connector_alpha_final")})
  results_path = os.path.join(workdir, RESULTS)
  if not os.path.exists(results_path):
    row["status"] = ("not started" if not os.path.isdir(workdir) else
                     f"not finished (step {summary['last_step']})"
                     if summary["last_step"] is not None else "not finished")
    return row
  with open(results_path) as f:
    results = json.load(f)
  info_path = os.path.join(workdir, INFO)
  info = {}
  if os.path.exists(info_path):  # absent for runs trained standalone (rvlm.main)
    with open(info_path) as f:
      info = json.load(f)
  generated = results.get("generated_exact_match_by_depth") or {}
  row.update({
      "status": "done (resumed)" if info.get("resumed") else "done",
      "step": results.get("step"),
      "split": results.get("split"),
      "accuracy_by_depth": results.get("accuracy_by_depth", {}),
      "majority_baseline": results.get("majority_baseline"),
      "generated_exact_match": generated[max(generated, key=int)] if generated else None,
      "wall_time_s": info.get("wall_time_s"),
  })
  row.update({k: info[k] for k in ("final_train_loss", "steps_per_sec",
                                   "connector_alpha_final") if k in info})
  return row


def gather(planned, out):
  """The sweep's table rows, read from OUT/runs/<name>/."""
  return [_row(p, run_workdir(out, p.name)) for p in planned]


def _columns(rows):
  """[(csv name, markdown header, row -> value, markdown format)]."""
  depths = sorted({d for r in rows for d in r.get("accuracy_by_depth", {})}, key=int)
  cols = [("run", "run", lambda r: r["run"], str),
          ("overrides", "overrides", lambda r: r["overrides"], str),
          ("status", "status", lambda r: r["status"], str),
          ("step", "step", lambda r: r.get("step"), str),
          ("split", "split", lambda r: r.get("split"), str)]
  for d in depths:
    cols.append((f"accuracy_r{d}", f"acc r={d}",
                 lambda r, d=d: r.get("accuracy_by_depth", {}).get(d), "{:.3f}".format))
  cols.append(("majority_baseline", "majority", lambda r: r.get("majority_baseline"),
               "{:.3f}".format))
  if any(r.get("generated_exact_match") is not None for r in rows):
    cols.append(("generated_exact_match_final_depth", "generated EM (final r)",
                 lambda r: r.get("generated_exact_match"), "{:.3f}".format))
  cols += [("final_train_loss", "train loss", lambda r: r.get("final_train_loss"),
            "{:.4f}".format),
           ("steps_per_sec", "steps/s", lambda r: r.get("steps_per_sec"), "{:.2f}".format),
           ("wall_time_s", "wall (s)", lambda r: r.get("wall_time_s"), "{:.0f}".format),
           ("connector_alpha", "connector alpha", lambda r: r.get("connector_alpha_final"),
            "{:.3f}".format)]
  return cols


def markdown_table(rows):
  cols = _columns(rows)
  cell = lambda v, fmt: "-" if v is None else fmt(v).replace("|", "\\|")  # noqa: E731
  lines = ["| " + " | ".join(c[1] for c in cols) + " |",
           "|" + "|".join("---" for _ in cols) + "|"]
  lines += ["| " + " | ".join(cell(get(r), fmt) for _, _, get, fmt in cols) + " |"
            for r in rows]
  return "\n".join(lines)


def csv_text(rows):
  cols = _columns(rows)
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow([c[0] for c in cols])
  for r in rows:
    writer.writerow(["" if get(r) is None else get(r) for _, _, get, _ in cols])
  return buf.getvalue()


def write_tables(out, planned, *, sweep_path, config_file):
  """OUT/sweep.md (what was swept, what the columns mean, the table) and OUT/sweep.csv;
  returns (markdown, paths, rows)."""
  rows = gather(planned, out)
  varied = {field for p in planned for field in p.varied}
  shared = overrides_text(planned[0], set(planned[0].overrides) - varied)
  md = (f"# Sweep {sweep_path}\n\n"
        f"Config `{config_file}`" + (f", shared overrides `{shared}`" if shared else "") +
        ".\n\nacc r=d: teacher-forced exact match on each run's primary eval split at "
        "recursion depth d; majority: always answering that split's most frequent answer; "
        "train loss and connector alpha (mean |alpha|): the last logged training window; "
        "steps/s: median over the logged windows; wall: the run's last invocation "
        "(compile + train + final eval; '(resumed)': the part after a restart). "
        "'-': not recorded.\n\n" + markdown_table(rows) + "\n")
  paths = [os.path.join(out, TABLE_MD), os.path.join(out, TABLE_CSV)]
  for path, text in zip(paths, (md, csv_text(rows))):
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)
  return md, paths, rows


# ---- python -m rvlm.sweep ----------------------------------------------------------


def define_flags(fv):
  """The CLI's flags, in their own FlagValues: rvlm/experiments/ import this module and
  define their own --out."""
  flags.DEFINE_string("sweep", None, "Sweep file (defines get_sweep()).", flag_values=fv)
  flags.DEFINE_string("out", None, "Sweep directory: runs in OUT/runs/<name>/, tables in "
                      "OUT/sweep.{md,csv}; a gs:// path is fine for --launcher=tpu.",
                      flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "Print the runs and their commands; train nothing.",
                    flag_values=fv)
  flags.DEFINE_enum("launcher", "local", LAUNCHERS, "local: train here, one run after "
                    "another; tpu, slurm: print one launch command per run.", flag_values=fv)
  flags.DEFINE_string("launcher_args", "", "Arguments passed through to the launcher "
                      "script, e.g. \"--name=my-tpu --zone=us-central2-b\".", flag_values=fv)
  flags.DEFINE_bool("aggregate_only", False, "Only gather OUT/runs/*/results.json into the "
                    "tables (runs trained elsewhere, copied back).", flag_values=fv)


def run_cli(fv):
  """Plans, then prints, trains or aggregates; returns the table rows (None if only
  commands were printed)."""
  if not fv.sweep or not fv.out:
    raise SweepError("--sweep and --out are required")
  try:
    launcher_args = shlex.split(fv.launcher_args)
  except ValueError as e:
    raise SweepError(f"--launcher_args={fv.launcher_args!r}: {e}") from None
  if launcher_args and fv.launcher == "local":
    raise SweepError("--launcher_args is for --launcher=tpu or slurm")
  local = fv.launcher == "local" or fv.aggregate_only
  if local and "://" in fv.out:
    raise SweepError(f"--out={fv.out}: training here and --aggregate_only need a local "
                     "directory (copy the runs back first)")
  sweep = load_sweep_file(fv.sweep)
  planned = plan(sweep, fv.sweep)
  out = os.path.abspath(fv.out) if local else fv.out
  if not fv.aggregate_only and (fv.dry_run or fv.launcher != "local"):
    print(script(planned, sweep_path=fv.sweep, config_file=sweep["config"], out=out,
                 launcher=fv.launcher, launcher_args=launcher_args, dry_run=fv.dry_run))
    return None
  os.makedirs(out, exist_ok=True)
  try:
    if not fv.aggregate_only:
      run_all([Run(p.name, p.config, run_workdir(out, p.name)) for p in planned])
  finally:  # a failed or interrupted run still leaves the table of the others
    md, paths, rows = write_tables(out, planned, sweep_path=fv.sweep,
                                   config_file=sweep["config"])
    print(md)
    print("wrote " + ", ".join(paths))
  return rows


def main(argv):
  """`argv` is the whole command line (program name first), flags included."""
  return cli.run_own_flags(argv, prog="rvlm.sweep", define_flags=define_flags, run=run_cli,
                           errors=(SweepError,))


if __name__ == "__main__":
  metrics.quiet_library_logs()
  app.run(main, flags_parser=cli.program_name_only)
