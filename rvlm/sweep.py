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
trainer's own check_config before anything runs: an unknown field, a wrong type or an
incompatible combination (recursion mode 'none' with R > 1) fails the sweep up front.

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
import difflib
import importlib.util
import io
import itertools
import json
import os
import re
import shlex
import sys
import time
import warnings

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np

from rvlm import metrics
from rvlm import train

RESULTS, INFO = "results.json", "run_info.json"
TABLE_MD, TABLE_CSV = "sweep.md", "sweep.csv"
LAUNCHERS = ("local", "tpu", "slurm")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_KEYS = ("config", "base", "grid", "runs", "name")
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._+=-]")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=,-]*")
_MAX_NAME = 200  # file names are capped at 255 bytes; leave room for the temp suffixes


@dataclasses.dataclass
class Run:
  name: str
  config: ml_collections.ConfigDict
  workdir: str


class SweepInterrupted(RuntimeError):
  """A run was stopped by a signal; its checkpoint is saved and a rerun resumes it."""


class SweepError(ValueError):
  """A mistake in a sweep file or on the command line, found before anything runs."""


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


# ---- sweep files -------------------------------------------------------------------


@dataclasses.dataclass
class Planned:
  """One run of a sweep file, its config built and checked."""
  name: str
  varied: dict      # the run's own overrides (grid point, runs entry): what names it
  overrides: dict   # base updated by `varied`: every field its command sets
  args: list        # ['--config.FIELD=VALUE', ...], as config_flags parses them
  config: ml_collections.ConfigDict


def load_sweep_file(path):
  """The dict returned by `get_sweep()` of the sweep file at `path`."""
  if not os.path.isfile(path):
    raise SweepError(f"--sweep={path}: no such file")
  _configs_importable()
  spec = importlib.util.spec_from_file_location("rvlm_sweep_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"{path}: defines no get_sweep()")
  sweep = module.get_sweep()
  if isinstance(sweep, ml_collections.ConfigDict):
    sweep = sweep.to_dict()
  if not isinstance(sweep, dict):
    raise SweepError(f"{path}: get_sweep() returned {type(sweep).__name__}, not a dict")
  return sweep


def _configs_importable():
  # configs/ sits beside the package and is not installed; config files import it.
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _config_path(config_file):
  path = config_file.partition(":")[0]
  return path if os.path.isabs(path) else os.path.join(ROOT, path)


def build_config(config_file, args):
  """The config `python -m rvlm.main --config=<config_file> <args>` trains."""
  _configs_importable()
  path, sep, arg = config_file.partition(":")
  argv = ["rvlm.main", f"--config={_config_path(path)}{sep}{arg}", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  with warnings.catch_warnings():
    # config_flags loads the file with the deprecated SourceFileLoader.load_module: one
    # warning per build, i.e. per run of a sweep, all about the library, none the sweep.
    warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
    fv(argv)
  return fv.config


def _leaf(config, field):
  """The default value of dotted `field` in `config`; SweepError naming it if absent."""
  node, parts = config, field.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(parts[:i])
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, known, n=1)
      hint = f"; did you mean {'.'.join(parts[:i] + close)!r}?" if close else ""
      raise SweepError(f"unknown config field {field!r}: "
                       f"{'config.' + where if where else 'config'} has no {part!r}{hint}")
    node = node[part]
  if isinstance(node, ml_collections.ConfigDict):
    raise SweepError(f"config field {field!r} is a group of fields; override its leaves "
                     f"(e.g. {field}.{next(iter(node.keys()))})")
  return node


def flag_text(field, value, default):
  """VALUE of `--config.FIELD=VALUE` that config_flags parses back to `value`; the
  parser is chosen by the type of the field's default."""
  def wrong(expected):
    return SweepError(f"config field {field!r} holds {type(default).__name__} "
                      f"({default!r}); the sweep gives {value!r}, not {expected}")
  if isinstance(default, bool):
    if not isinstance(value, (bool, np.bool_)):
      raise wrong("a bool")
    return "true" if value else "false"
  if isinstance(default, int):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
      raise wrong("an int")
    return str(int(value))
  if isinstance(default, float):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
      raise wrong("a number")
    return repr(float(value))
  if isinstance(default, str):
    if not isinstance(value, str):
      raise wrong("a string")
    return value
  if isinstance(default, tuple):
    if not isinstance(value, (tuple, list)):
      raise wrong("a tuple")
    return _literal(tuple(value))
  raise SweepError(f"config field {field!r} holds {type(default).__name__}, which the "
                   "command line cannot override")


def _literal(value):
  """A Python literal of `value` with strings in double quotes: inside the printed
  commands' single shell quotes, repr's single quotes would each need '"'"'."""
  if isinstance(value, str):
    return json.dumps(value)  # JSON's string escapes are all valid Python escapes
  if isinstance(value, (tuple, list)):
    items = [_literal(v) for v in value]
    if isinstance(value, list):
      return "[" + ", ".join(items) + "]"
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
  return repr(value)


def _expected(value, default):
  if isinstance(default, tuple):
    return tuple(value)
  return float(value) if isinstance(default, float) else value


def _name_text(value):
  if isinstance(value, (bool, np.bool_)):
    return "true" if value else "false"
  if isinstance(value, (float, np.floating)):
    return repr(float(value))
  if isinstance(value, (tuple, list)):
    return "+".join(_name_text(v) for v in value)
  return str(value)


def _short_keys(fields):
  """{field: shortest dotted suffix of it that no other field of the sweep ends with}."""
  short = {}
  for field in fields:
    parts = field.split(".")
    for n in range(1, len(parts) + 1):
      suffix = ".".join(parts[-n:])
      if not any(o != field and (o == suffix or o.endswith("." + suffix)) for o in fields):
        break
    short[field] = suffix
  return short


def default_name(varied, short):
  if not varied:
    return "default"
  return ",".join(f"{short[k]}={_SAFE_CHARS.sub('_', _name_text(v))}"
                  for k, v in varied.items())


def _mapping(sweep, key, where):
  value = sweep.get(key) or {}
  if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
    raise SweepError(f"{where}: '{key}' must be a dict of dotted config fields")
  return value


def expand(sweep, where="sweep"):
  """[(varied, overrides)] of a sweep dict, in order: runs entries outer, grid inner."""
  unknown = sorted(set(sweep) - set(SWEEP_KEYS))
  if unknown:
    raise SweepError(f"{where}: unknown key(s) {unknown}; a sweep has {list(SWEEP_KEYS)}")
  if not isinstance(sweep.get("config"), str) or not sweep["config"]:
    raise SweepError(f"{where}: 'config' (the config file runs start from) is required")
  base, grid = _mapping(sweep, "base", where), _mapping(sweep, "grid", where)
  for field, values in grid.items():
    if not isinstance(values, (list, tuple)) or not values:
      raise SweepError(f"{where}: grid[{field!r}] must be a non-empty list of values")
  entries = sweep.get("runs")
  if entries is not None and (not isinstance(entries, (list, tuple)) or not entries
                              or not all(isinstance(e, dict) for e in entries)):
    raise SweepError(f"{where}: 'runs' must be a non-empty list of {{field: value}} dicts")
  if not grid and not entries:
    raise SweepError(f"{where}: defines no runs; give 'grid' or 'runs'")
  if "name" in sweep and not callable(sweep["name"]):
    raise SweepError(f"{where}: 'name' must be a function of a run's overrides")
  points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
  out = []
  for i, entry in enumerate(entries or [{}]):
    both = sorted(set(entry) & set(grid))
    if both:
      raise SweepError(f"{where}: runs[{i}] and the grid both set {both}")
    for point in points:
      varied = {**entry, **point}
      out.append((varied, {**base, **varied}))
  return out


def plan(sweep, where="sweep"):
  """The sweep's runs: named, their configs built as rvlm.main builds them and checked
  with the trainer's check_config. Raises SweepError listing every run that fails."""
  expanded = expand(sweep, where)
  config_file = sweep["config"]
  if not os.path.isfile(_config_path(config_file)):
    raise SweepError(f"{where}: config {config_file!r}: no such file (paths are relative "
                     f"to the repository root, {ROOT})")
  try:
    defaults = build_config(config_file, [])
  except Exception as e:  # the config file itself, or its ':arg', is broken
    raise SweepError(f"{where}: config {config_file!r} does not build: {e}") from e
  fields = list(dict.fromkeys(k for _, overrides in expanded for k in overrides))
  problems = []
  for field in fields:
    try:
      _leaf(defaults, field)
    except SweepError as e:
      problems.append(str(e))
  if problems:  # before any naming or building: nothing else is meaningful
    raise SweepError(f"{where}: " + "; ".join(problems))

  short = _short_keys(list(dict.fromkeys(k for varied, _ in expanded for k in varied)))
  planned, numbers, problems = [], [], []
  for i, (varied, overrides) in enumerate(expanded):
    name = sweep["name"](dict(varied)) if "name" in sweep else default_name(varied, short)
    label = f"run {i + 1} ({name})"
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or len(name) > _MAX_NAME:
      problems.append(f"{label}: not a usable directory name (letters, digits and "
                      f"'_.+=,-', at most {_MAX_NAME} characters); give the sweep a 'name'")
      continue
    try:
      args = [f"--config.{k}={flag_text(k, v, _leaf(defaults, k))}"
              for k, v in overrides.items()]
      config = build_config(config_file, args)
      for k, v in overrides.items():
        got, want = _leaf(config, k), _expected(v, _leaf(defaults, k))
        if got != want:
          raise SweepError(f"config.{k}={v!r} does not survive the command line "
                           f"(it parses back as {got!r})")
      train.check_config(config)
    except (SweepError, ValueError, flags.Error) as e:
      problems.append(f"{label}: {' '.join(str(e).split())}")
      continue
    planned.append(Planned(name, dict(varied), dict(overrides), args, config))
    numbers.append(i + 1)
  names = [p.name for p in planned]
  for dup in sorted({n for n in names if names.count(n) > 1}):
    problems.append(f"runs {[k for k, n in zip(numbers, names) if n == dup]} are all "
                    f"named {dup!r}; give the sweep a 'name' function")
  if problems:
    raise SweepError(f"{where}: " + "; ".join(problems))
  return planned


# ---- commands ----------------------------------------------------------------------


def run_workdir(out, name):
  # Not os.path: OUT may be a gs:// URL for the TPU launcher.
  return f"{out.rstrip('/')}/runs/{name}"


def command(launcher, config_file, workdir, args, launcher_args=()):
  """The shell command that trains one run with `launcher`."""
  own = [f"--config={config_file}", f"--workdir={workdir}"]
  if launcher == "local":
    words = ["python", "-m", "rvlm.main", *own, *args]
  elif launcher == "tpu":
    words = ["launch/tpu/tpu.sh", "run", *launcher_args, *own, *(["--", *args] if args else [])]
  elif launcher == "slurm":
    words = ["launch/slurm/submit.sh", *launcher_args, *own, *(["--", *args] if args else [])]
  else:
    raise SweepError(f"--launcher={launcher}: choose one of {LAUNCHERS}")
  return shlex.join(words)


def script(planned, *, sweep_path, config_file, out, launcher, launcher_args, dry_run):
  """The printed plan: a comment block per run and its command (a runnable script)."""
  n = len(planned)
  what = "dry run, nothing trained" if dry_run else "commands only, nothing run here"
  lines = [f"# sweep {sweep_path}: {n} run{'s' if n != 1 else ''} of {config_file}, "
           f"launcher {launcher} ({what}); run from {ROOT}"]
  if launcher == "tpu":
    lines.append("# tpu.sh run detaches and refuses while a run is alive on its TPU: start "
                 "each line once the previous run has finished, or give lines their own "
                 "--name")
  for i, p in enumerate(planned, 1):
    workdir = run_workdir(out, p.name)
    lines += [f"# [{i}/{n}] {p.name}: {overrides_text(p, p.varied)}",
              f"#   workdir {workdir}",
              command(launcher, config_file, workdir, p.args, launcher_args)]
  if launcher != "local":
    lines.append(f"# when the runs have finished, copy {run_workdir(out, '')} to LOCAL/runs/ "
                 "and gather the table with: " + shlex.join(
                     ["python", "-m", "rvlm.sweep", f"--sweep={sweep_path}", "--out=LOCAL",
                      "--aggregate_only"]))
  return "\n".join(lines)


# ---- the table ---------------------------------------------------------------------


def overrides_text(p, fields):
  """'FIELD=VALUE ...' of `fields` as p's command line spells them."""
  return " ".join(arg[len("--config."):] for arg, field in zip(p.args, p.overrides)
                  if field in fields)


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
  fv = flags.FlagValues()
  define_flags(fv)
  try:
    rest = fv(argv)
    if len(rest) > 1:
      raise SweepError(f"unexpected arguments: {' '.join(rest[1:])}")
    run_cli(fv)
  except (SweepError, flags.Error) as e:
    print("rvlm.sweep: error: " + " ".join(str(e).split()), file=sys.stderr)
    sys.exit(2)


def _global_flags_parser(argv):
  """app.run's parser: the global absl flags get only the program name, so that the
  whole command line reaches main's own FlagValues."""
  flags.FLAGS(argv[:1])
  return argv


if __name__ == "__main__":
  metrics.quiet_library_logs()
  app.run(main, flags_parser=_global_flags_parser)
