"""rvlm.sweep: sweep files expand into named runs checked up front; every launcher's
printed commands parse back into the sweep's configs; the 2 x 2 debug sweep trains end
to end and writes its table, and a rerun retrains nothing."""
import csv
import glob
import json
import os
import re
import shlex
import subprocess
import textwrap

from absl import flags
from ml_collections import config_flags
import pytest

from configs import debug
from rvlm import sweep
from rvlm import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Values that each take a different config_flags parser, and strings that need quoting.
TRICKY = {
    "optim.lr": 0.003,
    "optim.warmup_steps": 3,
    "eval.generated": False,
    "eval.splits": ("val", "test"),
    "optim.no_decay": (r".*scale$", "it's \"quoted\""),
    "data.mixture": "embedded:0.7, llava:0.3",
    "init_from": "",
}


def write_sweep(tmp_path, body, name="sw.py"):
  path = tmp_path / name
  path.write_text(textwrap.dedent(body))
  return str(path)


def cli(*args):
  return sweep.main(["rvlm.sweep", *args])


def cli_error(capsys, *args):
  with pytest.raises(SystemExit) as e:
    cli(*args)
  assert e.value.code == 2
  return capsys.readouterr().err


@pytest.fixture
def no_training(monkeypatch):
  def boom(config, workdir):
    raise AssertionError(f"trained {workdir}")
  monkeypatch.setattr(train, "train_and_evaluate", boom)


def parse_back(config_file, args):
  """The config rvlm.main's --config flag yields for `args`, parsed as its own
  command line would be (a fresh flag set, config_flags' parsers)."""
  fv = flags.FlagValues()
  argv = ["rvlm.main", "--config=" + os.path.join(ROOT, config_file), *args]
  config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def debug_with(overrides):
  c = debug.get_config()
  for field, value in overrides.items():
    *path, leaf = field.split(".")
    node = c
    for part in path:
      node = node[part]
    node[leaf] = value
  return c


def commands(stdout):
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def test_grid_times_runs_names_and_overrides():
  planned = sweep.plan(dict(
      config="configs/debug.py",
      base={"train.total_steps": 7, "optim.lr": 1e-3},
      runs=[{"model.recursion.mode": "vanilla", "loss.kind": "final_only"},
            {"model.recursion.mode": "connector"}],
      grid={"optim.lr": [2e-3, 5e-4], "model.vit.depth": [1], "model.decoder.depth": [2]}))
  assert [p.name for p in planned] == [
      "mode=vanilla,kind=final_only,lr=0.002,vit.depth=1,decoder.depth=2",
      "mode=vanilla,kind=final_only,lr=0.0005,vit.depth=1,decoder.depth=2",
      "mode=connector,lr=0.002,vit.depth=1,decoder.depth=2",
      "mode=connector,lr=0.0005,vit.depth=1,decoder.depth=2"]
  p = planned[1]
  # The run's own value wins over base; base fields are set but do not name the run.
  assert p.overrides["optim.lr"] == 5e-4 and "train.total_steps" not in p.varied
  assert (p.config.optim.lr, p.config.train.total_steps, p.config.loss.kind) == (5e-4, 7, "final_only")
  assert planned[2].config.loss.kind == debug.get_config().loss.kind


def test_name_function_and_name_checks():
  base = dict(config="configs/debug.py", grid={"seed": [0, 1]})
  assert [p.name for p in sweep.plan(dict(base, name=lambda o: f"s{o['seed']}"))] == ["s0", "s1"]
  with pytest.raises(sweep.SweepError, match="runs \\[1, 2\\] are all named 'same'"):
    sweep.plan(dict(base, name=lambda o: "same"))
  with pytest.raises(sweep.SweepError, match="run 1 \\(a/0\\): not a usable directory name"):
    sweep.plan(dict(base, name=lambda o: f"a/{o['seed']}"))
  # Derived names are made filesystem-safe; values that become equal collide loudly.
  with pytest.raises(sweep.SweepError, match="are all named 'mixture=a_b'"):
    sweep.plan(dict(config="configs/debug.py", grid={"data.mixture": ["a/b", "a b"]}))


@pytest.mark.parametrize("body, message", [
    ('grid={"optim.lrr": [1e-3]}',
     "unknown config field 'optim.lrr': config.optim has no 'lrr'; did you mean 'optim.lr'"),
    ('grid={"model.vit": [1]}', "config field 'model.vit' is a group of fields"),
    ('grid={"train.total_steps": [5, 6.5]}',
     "run 2 \\(total_steps=6.5\\): config field 'train.total_steps' holds int"),
    ('grid={"eval.splits": ["test"]}', "holds tuple .* the sweep gives 'test', not a tuple"),
    # Incompatible values: the trainer's own check, for every run, before any trains.
    ('runs=[{"model.recursion.mode": "connector"}, {"model.recursion.mode": "none"}]',
     "run 2 \\(mode=none\\): config.model.recursion.num_steps=2: mode 'none'"),
    ('runs=[{"seed": 1}], grid={"seed": [2]}', "runs\\[0\\] and the grid both set \\['seed'\\]"),
    ('base={"seed": 1}', "defines no runs"),
    ('grdi={"seed": [1]}', "unknown key\\(s\\) \\['grdi'\\]"),
])
def test_mistakes_fail_before_anything_runs(tmp_path, capsys, no_training, body, message):
  path = write_sweep(tmp_path, f"""
      def get_sweep():
        return dict(config="configs/debug.py", {body})
      """)
  out = tmp_path / "out"
  err = cli_error(capsys, f"--sweep={path}", f"--out={out}")
  assert err.startswith("rvlm.sweep: error: ")
  assert re.search(message, err), err
  assert not out.exists()


def test_cli_argument_mistakes(tmp_path, capsys):
  path = os.path.join(ROOT, "configs/sweeps/debug_2x2.py")
  assert "need a local directory" in cli_error(capsys, f"--sweep={path}", "--out=gs://b/sw")
  assert "is for --launcher=tpu or slurm" in cli_error(
      capsys, f"--sweep={path}", f"--out={tmp_path}", "--launcher_args=--name=x")
  assert "no such file" in cli_error(capsys, f"--sweep={tmp_path}/none.py", f"--out={tmp_path}")


def test_local_dry_run_commands_parse_back_to_the_sweep_configs(tmp_path, capsys, no_training):
  path = write_sweep(tmp_path, f"""
      def get_sweep():
        return dict(config="configs/debug.py", base={TRICKY!r},
                    grid={{"model.recursion.num_steps": [1, 3], "optim.b1": [0.8]}})
      """)
  out = tmp_path / "out"
  cli(f"--sweep={path}", f"--out={out}", "--dry_run")
  stdout = capsys.readouterr().out
  assert not out.exists()
  cmds = commands(stdout)
  assert len(cmds) == 2
  for cmd, steps in zip(cmds, (1, 3)):
    name = f"num_steps={steps},b1=0.8"
    assert f"# [{steps // 2 + 1}/2] {name}: model.recursion.num_steps={steps} optim.b1=0.8" in stdout
    assert cmd[:5] == ["python", "-m", "rvlm.main", "--config=configs/debug.py",
                       f"--workdir={out}/runs/{name}"]
    want = debug_with({**TRICKY, "model.recursion.num_steps": steps, "optim.b1": 0.8})
    assert parse_back("configs/debug.py", cmd[5:]).to_dict() == want.to_dict()


@pytest.mark.parametrize("launcher, launcher_args, head", [
    ("tpu", "--name=my-tpu --zone=us-central2-b --project='my project'",
     ["launch/tpu/tpu.sh", "run", "--name=my-tpu", "--zone=us-central2-b",
      "--project=my project"]),
    ("slurm", "--partition=gpu --gres=gpu:1", ["launch/slurm/submit.sh", "--partition=gpu",
                                              "--gres=gpu:1"]),
])
def test_launcher_commands(tmp_path, capsys, monkeypatch, no_training, launcher,
                           launcher_args, head):
  monkeypatch.chdir(tmp_path)  # a gs:// OUT must not turn into a local directory
  base = {**TRICKY, "loss.step_weights": (1.0, 0.5)}  # debug's R = 2
  path = write_sweep(tmp_path, f"""
      def get_sweep():
        return dict(config="configs/debug.py", base={base!r},
                    runs=[{{"seed": 0}}, {{"seed": 1, "model.recursion.mode": "vanilla"}}])
      """)
  out = "gs://bucket/sweeps/x" if launcher == "tpu" else "/shared/sweeps/x"
  for dry_run in ([], ["--dry_run"]):  # both print and run nothing
    cli(f"--sweep={path}", f"--out={out}", f"--launcher={launcher}",
        f"--launcher_args={launcher_args}", *dry_run)
    stdout = capsys.readouterr().out
    assert os.listdir(tmp_path) == ["sw.py"]
    cmds = commands(stdout)
    assert len(cmds) == 2
    for cmd, (name, extra) in zip(cmds, [("seed=0", {"seed": 0}),
                                         ("seed=1,mode=vanilla",
                                          {"seed": 1, "model.recursion.mode": "vanilla"})]):
      split = cmd.index("--")
      assert cmd[:split] == head + ["--config=configs/debug.py",
                                    f"--workdir={out}/runs/{name}"]
      want = debug_with({**base, **extra})
      assert parse_back("configs/debug.py", cmd[split + 1:]).to_dict() == want.to_dict()
    assert f"# when the runs have finished, copy {out}/runs/ to LOCAL/runs/" in stdout
    assert f"--sweep={path} --out=LOCAL --aggregate_only" in stdout


@pytest.mark.parametrize("launcher, out, launcher_args", [
    ("tpu", "gs://bucket/sw", "--name=my-tpu --zone=us-central2-b --dry_run"),
    ("slurm", "/shared/sw", "--nodes=1 --gpus_per_node=2 --partition=gpu --dry_run"),
])
def test_printed_commands_are_accepted_by_the_launchers(capsys, launcher, out, launcher_args):
  # The launchers' own --dry_run (passed through) prints what they would run.
  cli(f"--sweep={os.path.join(ROOT, 'configs/sweeps/debug_2x2.py')}", f"--out={out}",
      f"--launcher={launcher}", f"--launcher_args={launcher_args}")
  stdout = capsys.readouterr().out
  done = subprocess.run(["bash", "-c", stdout], cwd=ROOT, capture_output=True, text=True,
                        check=True, timeout=60).stdout.splitlines()
  assert len(done) == 4
  for line, name in zip(done, ["num_steps=1,seed=0", "num_steps=1,seed=1",
                               "num_steps=2,seed=0", "num_steps=2,seed=1"]):
    assert line.startswith("gcloud compute tpus tpu-vm ssh my-tpu" if launcher == "tpu"
                           else "sbatch ")
    assert f"--workdir={out}/runs/{name}" in line
    assert "--config.model.recursion.{} --config.{}".format(*name.split(",")) in line


def test_every_sweep_file_plans():
  files = sorted(f for f in glob.glob(os.path.join(ROOT, "configs/sweeps/*.py"))
                 if not f.endswith("__init__.py"))
  planned = {os.path.basename(f): sweep.plan(sweep.load_sweep_file(f), f) for f in files}
  assert [p.name for p in planned["debug_2x2.py"]] == [
      "num_steps=1,seed=0", "num_steps=1,seed=1", "num_steps=2,seed=0", "num_steps=2,seed=1"]
  rec = planned["recursion.py"]
  assert [p.name for p in rec] == [f"{m}_seed{s}" for m in (
      "standard", "vanilla_R3", "rvlm_R2", "rvlm_R3", "rvlm_R4") for s in (0, 1)]
  assert {(p.config.model.recursion.mode, p.config.loss.kind) for p in rec} == {
      ("none", "monotonic"), ("vanilla", "final_only"), ("connector", "monotonic")}


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_debug_2x2_end_to_end_then_rerun_trains_nothing(tmp_path, capsys, monkeypatch):
  path = os.path.join(ROOT, "configs/sweeps/debug_2x2.py")
  out = tmp_path / "sweep"
  cli(f"--sweep={path}", f"--out={out}")
  stdout = capsys.readouterr().out
  md, rows = (out / "sweep.md").read_text(), read_csv(out / "sweep.csv")
  assert md in stdout
  names = ["num_steps=1,seed=0", "num_steps=1,seed=1", "num_steps=2,seed=0",
           "num_steps=2,seed=1"]
  assert [r["run"] for r in rows] == names
  table = md[md.index("| run |"):].splitlines()
  assert table[0].startswith("| run | overrides | status | step | split | acc r=1 | acc r=2 "
                           "| majority | train loss | steps/s | wall (s) | connector alpha")
  for row, name in zip(rows, names):
    workdir = out / "runs" / name
    results = json.loads((workdir / "results.json").read_text())
    info = json.loads((workdir / "run_info.json").read_text())
    steps = results["accuracy_by_depth"]
    assert row["status"] == "done" and row["step"] == "10" and row["split"] == "test"
    assert row["overrides"] == "model.recursion.{} {}".format(*name.split(","))
    assert float(row["accuracy_r1"]) == steps["1"]
    assert row["accuracy_r2"] == (str(steps["2"]) if "2" in steps else "")
    assert float(row["majority_baseline"]) == results["majority_baseline"]
    assert float(row["final_train_loss"]) == info["final_train_loss"]
    assert float(row["steps_per_sec"]) == info["steps_per_sec"]
    assert float(row["wall_time_s"]) == info["wall_time_s"] > 0
    assert float(row["connector_alpha"]) == info["connector_alpha_final"]
    assert f"| {name} | " in md
  # Each run trained its own config: the seeds start from different weights.
  assert rows[0]["final_train_loss"] != rows[1]["final_train_loss"]
  # Depth 2 is blank ('-') for the R = 1 runs, as is nothing else in a finished row.
  first = table[2].split(" | ")
  assert first[6] == "-" and "-" not in first[:6] + first[7:]

  def boom(config, workdir):
    raise AssertionError(f"retrained {workdir}")
  monkeypatch.setattr(train, "train_and_evaluate", boom)
  before = {p: (out / p).read_bytes() for p in ("sweep.md", "sweep.csv")}
  cli(f"--sweep={path}", f"--out={out}")
  assert {p: (out / p).read_bytes() for p in before} == before

  # Runs trained elsewhere: a standalone rvlm.main run has no run_info.json (its train
  # log gives speed and loss, the wall time stays blank); an unfinished one is marked.
  info0 = out / "runs" / names[0] / "run_info.json"
  saved_info = info0.read_bytes()
  info0.unlink()
  for f in ("results.json", "run_info.json"):
    (out / "runs" / names[3] / f).unlink()
  cli(f"--sweep={path}", f"--out={out}", "--aggregate_only")
  now = read_csv(out / "sweep.csv")
  assert now[0] == dict(rows[0], wall_time_s="")
  assert now[1:3] == rows[1:3]
  assert now[3]["status"] == "not finished (step 10)"
  assert now[3]["accuracy_r1"] == now[3]["wall_time_s"] == ""
  assert now[3]["steps_per_sec"] == rows[3]["steps_per_sec"]
  # A full rerun trains the unfinished run only (refused here) and still writes the table.
  info0.write_bytes(saved_info)
  with pytest.raises(AssertionError, match="retrained .*num_steps=2,seed=1"):
    cli(f"--sweep={path}", f"--out={out}")
  assert read_csv(out / "sweep.csv")[:3] == rows[:3]
