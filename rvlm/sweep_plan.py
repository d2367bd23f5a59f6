"""Sweep files into checked, named runs and the commands that train them.

`plan(load_sweep_file(path))` reads a sweep file (schema: rvlm/sweep.py), builds every
run's config exactly as `python -m rvlm.main --config=FILE --config.FIELD=VALUE ...`
would (ml_collections config_flags) and checks it with the trainer's check_config, so a
mistake fails the sweep before anything trains; `script` prints the runs' commands for
rvlm.main, launch/tpu/tpu.sh or launch/slurm/submit.sh. rvlm/sweep.py runs them and
tabulates the results.
"""
import dataclasses
import difflib
import importlib.util
import itertools
import json
import os
import re
import shlex
import sys
import warnings

from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np

from rvlm import train

LAUNCHERS = ("local", "tpu", "slurm")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_KEYS = ("config", "base", "grid", "runs", "name")
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._+=-]")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=,-]*")
_MAX_NAME = 200  # file names are capped at 255 bytes; leave room for the temp suffixes


class SweepError(ValueError):
  """A mistake in a sweep file or on the command line, found before anything runs."""


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


def overrides_text(p, fields):
  """'FIELD=VALUE ...' of `fields` as p's command line spells them."""
  return " ".join(arg[len("--config."):] for arg, field in zip(p.args, p.overrides)
                  if field in fields)
