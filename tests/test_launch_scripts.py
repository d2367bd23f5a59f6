"""launch/: the TPU pod and SLURM launchers, through their --dry_run output.

No gcloud or SLURM here: the printed commands are checked word by word, the remote
scripts that `tpu.sh run`/`stop` send to each host are run locally in a fake home, and
the sbatch template runs with fake `scontrol`/`srun`/`python` on PATH that record what
they were given. Everything takes seconds.
"""
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import tarfile
import time

import pytest

BASH = shutil.which("bash")
ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
TPU = str(LAUNCH / "tpu" / "tpu.sh")
SUBMIT = str(LAUNCH / "slurm" / "submit.sh")
SBATCH = str(LAUNCH / "slurm" / "rvlm.sbatch")

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")

POD = ["--name=my-pod", "--zone=us-central2-b"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod", "--zone=us-central2-b"]


def _bash(script, *args, env=None, cwd=None):
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run([BASH, script, *args], capture_output=True, text=True, env=full_env,
                        cwd=cwd or ROOT, timeout=60)


def _lines(proc):
  """The commands a --dry_run printed, each split back into its words."""
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.splitlines()]


def _stub(directory, name, body):
  path = pathlib.Path(directory) / name
  path.write_text("#!" + BASH + "\n" + body)
  path.chmod(0o755)
  return path


def _remote(words):
  """The --command=... script of a `gcloud ... tpu-vm ssh` line."""
  commands = [w for w in words if w.startswith("--command=")]
  assert len(commands) == 1, words
  return commands[0][len("--command="):]


def test_scripts_parse():
  scripts = sorted(LAUNCH.rglob("*.sh")) + sorted(LAUNCH.rglob("*.sbatch"))
  names = {p.relative_to(ROOT).as_posix() for p in scripts}
  assert {"launch/tpu/tpu.sh", "launch/slurm/submit.sh", "launch/slurm/rvlm.sbatch",
          "launch/common.sh"} <= names
  for script in scripts:
    proc = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, f"{script}: {proc.stderr}"
  for script in (TPU, SUBMIT, SBATCH):
    assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_pass_shellcheck():
  scripts = [str(p) for p in sorted(LAUNCH.rglob("*.sh")) + sorted(LAUNCH.rglob("*.sbatch"))]
  proc = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True,
                        cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- launch/tpu/tpu.sh ---------------------------------------------------------------

@pytest.mark.parametrize("accelerator,runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v3-8", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-64", "v2-alpha-tpuv5"),
    ("v6e-16", "v2-alpha-tpuv6e")])
def test_tpu_create_default_runtime(accelerator, runtime):
  out = _lines(_bash(TPU, "create", *POD, f"--accelerator={accelerator}", "--dry_run"))
  assert out == [["gcloud", "compute", "tpus", "queued-resources", "create", "my-pod",
                  "--node-id=my-pod", "--zone=us-central2-b",
                  f"--accelerator-type={accelerator}", f"--runtime-version={runtime}"]]


def test_tpu_create_flags():
  out = _lines(_bash(TPU, "create", *POD, "--project=my-proj", "--accelerator=v4-32",
                     "--runtime=v2-alpha-tpuv4", "--spot", "--dry_run", "--",
                     "--network=my net"))
  assert out == [["gcloud", "compute", "tpus", "queued-resources", "create", "my-pod",
                  "--node-id=my-pod", "--zone=us-central2-b", "--project=my-proj",
                  "--accelerator-type=v4-32", "--runtime-version=v2-alpha-tpuv4", "--spot",
                  "--network=my net"]]
  out = _lines(_bash(TPU, "create", *POD, "--accelerator=v4-32", "--reserved", "--dry_run"))
  assert out[0][-1] == "--reserved"


def test_tpu_status_delete():
  out = _lines(_bash(TPU, "status", *POD, "--project=p", "--dry_run"))
  assert out == [["gcloud", "compute", "tpus", "queued-resources", "describe", "my-pod",
                  "--zone=us-central2-b", "--project=p"]]
  out = _lines(_bash(TPU, "delete", *POD, "--dry_run"))
  assert out == [["gcloud", "compute", "tpus", "queued-resources", "delete", "my-pod",
                  "--zone=us-central2-b", "--force"]]


def test_tpu_setup_ships_the_checkout(tmp_path):
  out = _lines(_bash(TPU, "setup", *POD, "--dry_run", env={"TMPDIR": str(tmp_path)}))
  tarball = str(tmp_path / "rvlm-my-pod.tar.gz")
  assert out[0] == ["git", "-C", str(ROOT), "archive", "--format=tar.gz",
                    f"--output={tarball}", "HEAD"]
  assert out[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                    "my-pod:rvlm.tar.gz", "--zone=us-central2-b", "--worker=all"]
  assert out[2][:-1] == SSH + ["--worker=all"]
  remote = _remote(out[2])
  assert "tar -xzf ~/rvlm.tar.gz -C ~/rvlm" in remote
  assert remote.endswith('~/rvlm-venv/bin/python -m pip install -e . "jax[tpu]"')
  assert out[3] == ["rm", "-f", tarball]
  assert len(out) == 4
  assert not os.path.exists(tarball)  # a dry run runs nothing
  # The archive command itself works here and holds the package.
  subprocess.run(out[0], check=True)
  with tarfile.open(tarball) as tar:
    assert {"setup.py", "rvlm/main.py", "configs/base.py"} <= set(tar.getnames())


@pytest.mark.parametrize("has_venv_module", [True, False])
def test_tpu_setup_on_a_fake_host(tmp_path, has_venv_module):
  """The script setup sends, run here on the tarball it ships: fake python3 and sudo
  record the virtualenv, apt and pip steps (when `python3 -m venv` fails for want of the
  distribution's python3-venv, setup installs it and tries again)."""
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  home.mkdir()
  bin_dir.mkdir()
  _stub(bin_dir, "python3", """
case "$1" in
  -c) exit 0 ;;  # python3 is new enough
  -m) if [[ -n ${FAKE_NO_VENV:-} && ! -e $HOME/apt_done ]]; then exit 1; fi
      echo "python3 $*" >> "$HOME/calls"
      mkdir -p "${@: -1}/bin"
      printf '#!%s\necho "$PWD: python $*" >> "$HOME/calls"\n' "$BASH" > "${@: -1}/bin/python"
      chmod +x "${@: -1}/bin/python" ;;
esac
""")
  _stub(bin_dir, "sudo", 'echo "sudo $*" >> "$HOME/calls"; touch "$HOME/apt_done"\n')
  env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}",
             TMPDIR=str(tmp_path), FAKE_NO_VENV="" if has_venv_module else "1")
  out = _lines(_bash(TPU, "setup", *POD, "--dry_run", env={"TMPDIR": str(tmp_path)}))
  subprocess.run(out[0], check=True)  # git archive
  shutil.copy(tmp_path / "rvlm-my-pod.tar.gz", home / "rvlm.tar.gz")  # what scp does
  proc = subprocess.run([BASH, "-c", _remote(out[2])], capture_output=True, text=True,
                        env=env, cwd=home, timeout=30)
  assert proc.returncode == 0, proc.stderr
  assert (home / "rvlm" / "setup.py").exists() and not (home / "rvlm.tar.gz").exists()
  apt = [] if has_venv_module else [
      "sudo apt-get update -q",
      "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3 python3-venv"]
  venv = f"python3 -m venv {home}/rvlm-venv"
  assert (home / "calls").read_text().splitlines() == apt + [
      venv if has_venv_module else venv.replace("venv ", "venv --clear "),
      f"{home}/rvlm: python -m pip install -q -U pip",
      f"{home}/rvlm: python -m pip install -e . jax[tpu]"]


def test_tpu_setup_from_git_url():
  out = _lines(_bash(TPU, "setup", *POD, "--repo=https://example.com/me/rvlm.git",
                     "--ref=v1", "--python=/opt/py/bin/python", "--dry_run"))
  assert len(out) == 1 and out[0][:-1] == SSH + ["--worker=all"]
  remote = _remote(out[0])
  assert remote.startswith(
      "py=/opt/py/bin/python; rm -rf ~/rvlm ~/rvlm-venv && git clone --depth=1 --branch=v1 "
      "https://example.com/me/rvlm.git ~/rvlm && cd ~/rvlm && ")
  assert '"$py" -m venv ~/rvlm-venv' in remote


EXTRA = ["--config.train.total_steps=5", "--config.note=it's a b", "--config.x="]


def _train_argv(remote):
  """The rvlm.main command inside a `run` remote script."""
  lexer = shlex.shlex(remote, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True  # words end at blanks and at ; & > | ( ) only
  words = list(lexer)
  start = words.index("nohup") + 1
  return words[start:words.index(">>", start)]


def test_tpu_run_command():
  proc = _bash(TPU, "run", *POD, "--project=p", "--config=configs/base.py:preset=tiny",
               "--workdir=gs://bucket/runs/a b", "--dry_run", "--", *EXTRA)
  out = _lines(proc)
  assert len(out) == 1
  assert out[0][:-1] == SSH + ["--project=p", "--worker=all"]
  remote = _remote(out[0])
  assert _train_argv(remote) == [
      "~/rvlm-venv/bin/python", "-m", "rvlm.main", "--distributed=on", "--config=configs/base.py:preset=tiny",
      "--workdir=gs://bucket/runs/a b", *EXTRA]
  assert "> ~/rvlm_my-pod.pid" in remote and ">> ~/rvlm_my-pod.log 2>&1 < /dev/null &" in remote
  assert "warning" not in proc.stderr


def test_tpu_run_config_path_and_workdir_warnings():
  proc = _bash(TPU, "run", *POD, f"--config={ROOT}/configs/base.py",
               "--workdir=/tmp/local", "--accelerator=v4-32", "--dry_run")
  assert _train_argv(_remote(_lines(proc)[0]))[4:6] == [
      "--config=configs/base.py", "--workdir=/tmp/local"]  # relative to ~/rvlm on the hosts
  assert "v4-32 has 4 hosts" in proc.stderr
  proc = _bash(TPU, "run", *POD, "--config=configs/base.py", "--workdir=/tmp/local",
               "--accelerator=v4-8", "--dry_run")
  assert proc.returncode == 0 and "warning" not in proc.stderr  # one host: fine
  proc = _bash(TPU, "run", *POD, "--config=configs/nope.py", "--workdir=gs://b/x", "--dry_run")
  assert proc.returncode == 0 and "configs/nope.py is not in" in proc.stderr


def test_tpu_logs_and_stop():
  out = _lines(_bash(TPU, "logs", *POD, "--dry_run"))
  assert out == [SSH + ["--worker=0", "--command=tail -n 200 -F ~/rvlm_my-pod.log"]]
  out = _lines(_bash(TPU, "logs", *POD, "--worker=3", "--dry_run"))
  assert out[0][-2] == "--worker=3"
  out = _lines(_bash(TPU, "stop", *POD, "--dry_run"))
  assert len(out) == 1 and out[0][:-1] == SSH + ["--worker=all"]
  assert 'kill -TERM "$p"' in _remote(out[0])


def test_tpu_remote_run_and_stop_on_a_fake_host(tmp_path):
  """The scripts `run` and `stop` send, run here: a fake home and a fake virtualenv."""
  home, bin_dir = tmp_path / "home", tmp_path / "home" / "rvlm-venv" / "bin"
  (home / "rvlm").mkdir(parents=True)
  bin_dir.mkdir(parents=True)
  _stub(bin_dir, "python", 'printf "%s\\n" "$@" > "$HOME/argv"\n'
        'trap \'echo TERM >> "$HOME/signals"; kill "$sleeper"; exit 0\' TERM\n'
        'echo training; sleep 30 & sleeper=$!; wait "$sleeper"\n')
  env = dict(os.environ, HOME=str(home))
  run = _remote(_lines(_bash(TPU, "run", *POD, "--config=configs/base.py",
                             "--workdir=gs://b/x", "--dry_run", "--", *EXTRA))[0])
  stop = _remote(_lines(_bash(TPU, "stop", *POD, "--dry_run"))[0])

  def remote(script):
    return subprocess.run([BASH, "-c", script], capture_output=True, text=True, env=env,
                          cwd=home, timeout=30)

  first = remote(run)
  assert first.returncode == 0 and "started pid" in first.stdout, first.stderr
  for _ in range(100):  # the detached process writes its arguments
    if (home / "argv").exists() and (home / "rvlm_my-pod.log").read_text():
      break
    time.sleep(0.05)
  argv = (home / "argv").read_text().splitlines()
  assert argv == ["-m", "rvlm.main", "--distributed=on", "--config=configs/base.py",
                  "--workdir=gs://b/x", *EXTRA]
  assert (home / "rvlm_my-pod.log").read_text() == "training\n"
  again = remote(run)
  assert again.returncode == 1 and "already running" in again.stderr
  stopped = remote(stop)
  assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
  assert (home / "signals").read_text() == "TERM\n"
  assert "not running" in remote(stop).stdout


@pytest.mark.parametrize("args,message", [
    ([], "SUBCOMMAND --name=NAME"),
    (["launch", *POD], "unknown subcommand 'launch'"),
    (["status", "--zone=z"], "status needs --name"),
    (["status", "--name=p"], "status needs --zone"),
    (["status", "--name=My_Pod", "--zone=z"], "--name=My_Pod: use lowercase"),
    (["create", *POD], "create needs --accelerator"),
    (["create", *POD, "--accelerator=v4-8", "--spot", "--reserved"], "exclude each other"),
    (["create", *POD, "--accelerator=x9-8"], "no default TPU software version"),
    (["run", *POD, "--workdir=gs://b/x"], "run needs --config"),
    (["run", *POD, "--config=configs/base.py"], "run needs --workdir"),
    (["run", *POD, "--bogus=1"], "unknown argument '--bogus=1'"),
    (["run", *POD, "--config"], "--config needs a value"),
    (["run", *POD, "--config=c", "--workdir=w", "--worker=1"], "--worker applies to logs"),
    (["status", *POD, "--", "--x"], "status takes no arguments after '--'"),
    (["logs", *POD, "--worker=all"], "must be a host index"),
    (["setup", *POD, "--ref=main"], "--ref applies to a git URL"),
])
def test_tpu_usage_errors(args, message):
  proc = _bash(TPU, *args, "--dry_run") if args else _bash(TPU)
  assert proc.returncode == 2
  assert message.lower() in proc.stderr.lower()
  assert proc.stdout == ""


def test_tpu_help():
  proc = _bash(TPU, "--help")
  assert proc.returncode == 0 and "queued resources" in proc.stdout


@pytest.mark.parametrize("args", [
    ["create", *POD, "--accelerator=v5litepod-16", "--spot", "--", "--network=n"],
    ["status", *POD], ["setup", *POD], ["logs", *POD, "--worker=1"], ["stop", *POD],
    ["delete", *POD],
    ["run", *POD, "--config=configs/base.py", "--workdir=gs://b/x", "--", *EXTRA]])
def test_tpu_runs_what_dry_run_prints(tmp_path, args):
  """Without --dry_run the same commands run: a fake gcloud records its arguments."""
  calls = tmp_path / "calls"
  calls.mkdir()
  _stub(tmp_path, "gcloud", 'n=$(ls "$CALLS" | wc -l); printf "%s\\0" "$@" > "$CALLS/$n"\n')
  env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "CALLS": str(calls),
         "TMPDIR": str(tmp_path)}
  cut = args.index("--") if "--" in args else len(args)
  dry = _lines(_bash(TPU, *args[:cut], "--dry_run", *args[cut:], env=env))
  assert not list(calls.iterdir())  # --dry_run ran nothing
  real = _bash(TPU, *args, env=env)
  assert real.returncode == 0, real.stderr
  ran = [f.read_text().split("\0")[:-1] for f in sorted(calls.iterdir(), key=lambda f: int(f.name))]
  assert ran == [words[1:] for words in dry if words[0] == "gcloud"]
  traced = [shlex.split(line[2:]) for line in real.stderr.splitlines() if line.startswith("+ ")]
  assert traced == dry


def test_tpu_accepts_the_sweep_lines():
  """rvlm.sweep --launcher=tpu prints lines of this form."""
  out = _lines(_bash(TPU, "run", "--name=pod-1", "--zone=europe-west4-a", "--project=proj",
                     "--config=configs/base.py", "--workdir=gs://b/out/runs/lr_3e-4",
                     "--dry_run", "--", "--config.optim.lr=0.0003",
                     "--config.model.recursion.num_steps=4"))
  assert _train_argv(_remote(out[0]))[3:] == [
      "--distributed=on", "--config=configs/base.py", "--workdir=gs://b/out/runs/lr_3e-4",
      "--config.optim.lr=0.0003", "--config.model.recursion.num_steps=4"]


# ---- launch/slurm/submit.sh ----------------------------------------------------------

def test_submit_command():
  out = _lines(_bash(SUBMIT, "--nodes=2", "--gpus_per_node=8", "--cpus_per_gpu=12",
                     "--partition=gpu", "--time=24:00:00", "--account=acct", "--qos=high",
                     "--python=/opt/venv/bin/python", "--sbatch=--constraint=a100",
                     "--dry_run", "--config=configs/base.py", "--workdir=/shared/runs/lr3",
                     "--", *EXTRA))
  assert out == [["sbatch", "--job-name=rvlm-lr3", "--nodes=2", "--ntasks-per-node=8",
                  "--gpus-per-task=1", "--cpus-per-task=12", "--partition=gpu",
                  "--time=24:00:00", "--account=acct", "--qos=high",
                  "--export=ALL,RVLM_PYTHON=/opt/venv/bin/python", "--constraint=a100",
                  f"--chdir={ROOT}", SBATCH, "--config=configs/base.py",
                  "--workdir=/shared/runs/lr3", *EXTRA]]


def test_submit_minimal_and_sweep_form(tmp_path):
  out = _lines(_bash(SUBMIT, "--nodes=1", "--gpus_per_node=4", "--config=configs/base.py",
                     "--workdir=/s/out/runs/a/", "--dry_run", "--", "--config.seed=1"))
  assert out == [["sbatch", "--job-name=rvlm-a", "--nodes=1", "--ntasks-per-node=4",
                  "--gpus-per-task=1", f"--chdir={ROOT}", SBATCH,
                  "--config=configs/base.py", "--workdir=/s/out/runs/a/", "--config.seed=1"]]
  # Without --dry_run: a fake sbatch receives exactly those words.
  _stub(tmp_path, "sbatch", 'printf "%s\\0" "$@" > "$CALLS"; echo "Submitted batch job 7"\n')
  calls = tmp_path / "calls"
  proc = _bash(SUBMIT, "--nodes=1", "--gpus_per_node=4", "--config=configs/base.py",
               "--workdir=/s/out/runs/a/", "--", "--config.seed=1",
               env={"PATH": f"{tmp_path}:{os.environ['PATH']}", "CALLS": str(calls)})
  assert proc.returncode == 0 and "Submitted batch job 7" in proc.stdout
  assert calls.read_text().split("\0")[:-1] == out[0][1:]


@pytest.mark.parametrize("args,message", [
    (["--gpus_per_node=8", "--config=c", "--workdir=w"], "give --nodes"),
    (["--nodes=2", "--config=c", "--workdir=w"], "give --gpus_per_node"),
    (["--nodes=two", "--gpus_per_node=8", "--config=c", "--workdir=w"], "positive integer"),
    (["--nodes=2", "--gpus_per_node=8", "--workdir=w"], "give --config"),
    (["--nodes=2", "--gpus_per_node=8", "--config=c"], "give --workdir"),
    (["--nodes=2", "--gpus_per_node=8", "--config=c", "--workdir=w", "--gpus=8"],
     "unknown argument '--gpus=8'"),
])
def test_submit_usage_errors(args, message):
  proc = _bash(SUBMIT, *args, "--dry_run")
  assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""


# ---- launch/slurm/rvlm.sbatch --------------------------------------------------------

def test_sbatch_resources():
  head = pathlib.Path(SBATCH).read_text().split("\nset -euo pipefail", 1)[0]
  directives = [line.split(None, 1)[1] for line in head.splitlines()
                if line.startswith("#SBATCH")]
  assert {"--gpus-per-task=1", "--requeue", "--signal=B:USR1@300",
          "--open-mode=append"} <= set(directives)
  assert any(d.startswith("--ntasks-per-node=") for d in directives)


def _fake_slurm(tmp_path, extra_env=None):
  """A PATH with fake scontrol/srun/python, and the environment of job 12345 on 2 nodes of
  2 GPUs each. The fake srun runs each task's command in turn, as SLURM would on its node."""
  bin_dir, out = tmp_path / "bin", tmp_path / "out"
  bin_dir.mkdir()
  out.mkdir()
  _stub(bin_dir, "scontrol", """
if [[ $1 == show && $2 == hostnames ]]; then tr ',' '\\n' <<< "$3"; exit 0; fi
echo "$*" >> "$FAKE_OUT/scontrol_calls"
""")
  _stub(bin_dir, "srun", """
printf '%s\\n' "$@" > "$FAKE_OUT/srun_args"
if [[ -n ${FAKE_SRUN_HANG:-} ]]; then
  trap 'echo TERM > "$FAKE_OUT/srun_term"; kill "$sleeper"; exit 143' TERM
  sleep 30 & sleeper=$!
  touch "$FAKE_OUT/srun_started"
  wait "$sleeper"
  exit 0
fi
while [[ $1 == -* ]]; do shift; done
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
per_node=$((SLURM_NTASKS / ${#nodes[@]}))
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURMD_NODENAME=${nodes[i / per_node]} "$@" || exit
done
""")
  _stub(bin_dir, "python", """
{ echo "node=$SLURMD_NODENAME cwd=$PWD"; printf '%s\\n' "$@"; } > "$FAKE_OUT/task_$SLURM_PROCID"
""")
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_OUT": str(out),
         "SLURM_JOB_ID": "12345", "SLURM_JOB_NODELIST": "gpu-a01,gpu-a02",
         "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "4", "SLURM_CPUS_PER_TASK": "6",
         "SLURM_SUBMIT_DIR": str(ROOT)}
  for key in ("RVLM_CONFIG", "RVLM_WORKDIR", "RVLM_PYTHON", "RVLM_REPO",
              "RVLM_COORDINATOR_PORT"):
    env[key] = ""
  env.update(extra_env or {})
  return env, out


def test_sbatch_starts_one_process_per_task(tmp_path):
  env, out = _fake_slurm(tmp_path)
  proc = _bash(SBATCH, "--config=configs/base.py", "--workdir=/shared/runs/x", *EXTRA,
               env=env, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert "coordinator gpu-a01:32345" in proc.stdout  # 20000 + 12345 % 20000
  assert (out / "srun_args").read_text().splitlines()[:3] == [
      "--kill-on-bad-exit=1", "--label", "--cpus-per-task=6"]
  for i in range(4):
    lines = (out / f"task_{i}").read_text().splitlines()
    assert lines[0] == f"node=gpu-a0{1 + i // 2} cwd={ROOT}"
    assert lines[1:] == ["-m", "rvlm.main", "--distributed=on",
                         "--coordinator_address=gpu-a01:32345", "--num_processes=4",
                         f"--process_id={i}", "--config=configs/base.py",
                         "--workdir=/shared/runs/x", *EXTRA]
  assert not (out / "scontrol_calls").exists()  # a run that ends is not requeued


def test_sbatch_settings_from_the_environment(tmp_path):
  env, out = _fake_slurm(tmp_path, {
      "RVLM_CONFIG": "configs/base.py:preset=tiny", "RVLM_WORKDIR": "gs://b/w",
      "RVLM_COORDINATOR_PORT": "4000", "RVLM_REPO": str(tmp_path)})
  proc = _bash(SBATCH, "--config.seed=3", env=env)
  assert proc.returncode == 0, proc.stderr
  lines = (out / "task_3").read_text().splitlines()
  assert lines[0].endswith(f"cwd={tmp_path}")
  assert lines[4:] == ["--coordinator_address=gpu-a01:4000", "--num_processes=4",
                       "--process_id=3", "--config=configs/base.py:preset=tiny",
                       "--workdir=gs://b/w", "--config.seed=3"]


def test_sbatch_needs_config_and_workdir(tmp_path):
  env, out = _fake_slurm(tmp_path)
  proc = _bash(SBATCH, "--config=configs/base.py", "--config.workdir=x", env=env)
  assert proc.returncode == 2 and "--workdir" in proc.stderr
  assert not (out / "srun_args").exists()


def test_sbatch_requeues_near_the_time_limit(tmp_path):
  """USR1 (--signal=B:USR1@300): SIGTERM to srun, wait for it, then scontrol requeue."""
  env, out = _fake_slurm(tmp_path, {"FAKE_SRUN_HANG": "1"})
  proc = subprocess.Popen([BASH, SBATCH, "--config=configs/base.py", "--workdir=/s/x"],
                          env=dict(os.environ, **env), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    for _ in range(200):
      if (out / "srun_started").exists():
        break
      time.sleep(0.05)
    assert (out / "srun_started").exists()
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=20)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert (out / "srun_term").read_text() == "TERM\n", stderr
  assert (out / "scontrol_calls").read_text() == "requeue 12345\n"
  assert "time limit is near" in stdout
  assert proc.returncode == 143  # srun's status
