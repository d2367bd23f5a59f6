#!/usr/bin/env python3
"""N processes of one rvlm command on this machine, joined by jax.distributed.

  python launch/local.py --num_processes=2 -- --config=configs/debug.py --workdir=/tmp/mp
  python launch/local.py --num_processes=2 --devices_per_process=4 --dry_run -- ...

Each process runs `python -m rvlm.main <args after -->` (or `--module`) with
RVLM_COORDINATOR_ADDRESS=127.0.0.1:PORT, RVLM_NUM_PROCESSES and RVLM_PROCESS_ID set
(rvlm/distributed.py) and, on CPU, its own `--devices_per_process` simulated devices;
with --platform=gpu each process gets one GPU instead (CUDA_VISIBLE_DEVICES). This is
the real multi-controller path of a pod, on one machine: what the multi-process tests
use, and a way to try a multi-host config before paying for hosts.

Output: every line of process i is echoed as `[pI] ...` and kept in
LOG_DIR/process_I.log. When one process fails, the others are left to notice it
themselves (JAX's heartbeat; see --heartbeat_timeout_s of rvlm.main) for --grace_s
seconds, then terminated. SIGTERM / SIGINT to this launcher are passed on to every
process (rvlm saves a checkpoint and stops at the same step everywhere). The exit
status is 0 when every process succeeded, else the first failure's status (128 + N
for a signal N).
"""
import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base, index, args, port):
  """The environment of process `index`."""
  env = dict(base)
  env.update(RVLM_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
             RVLM_NUM_PROCESSES=str(args.num_processes), RVLM_PROCESS_ID=str(index))
  if args.heartbeat_timeout_s:
    env["RVLM_HEARTBEAT_TIMEOUT_S"] = str(args.heartbeat_timeout_s)
  if args.platform == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
    # Wins over a simulated device count in XLA_FLAGS (e.g. a test session's 8).
    env["JAX_NUM_CPU_DEVICES"] = str(args.devices_per_process)
  else:
    first = index * args.devices_per_process
    env["CUDA_VISIBLE_DEVICES"] = ",".join(
        str(first + d) for d in range(args.devices_per_process))
  return env


def commands(args, port):
  """[(env changes, argv)] per process: what --dry_run prints and what is started."""
  argv = [args.python, "-m", args.module, *args.command]
  return [(process_env({}, i, args, port), argv) for i in range(args.num_processes)]


def _pump(stream, tag, log):
  for line in iter(stream.readline, ""):
    sys.stdout.write(f"[{tag}] {line}")
    sys.stdout.flush()
    log.write(line)
    log.flush()


def _describe(code):
  return f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"


def run(args, port):
  os.makedirs(args.log_dir, exist_ok=True)
  procs, pumps, logs = [], [], []
  for i, (_, argv) in enumerate(commands(args, port)):
    env = process_env(os.environ, i, args, port)
    log = open(os.path.join(args.log_dir, f"process_{i}.log"), "w")
    p = subprocess.Popen(argv, env=env, cwd=args.cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, bufsize=1)
    print(f"launch/local.py: process {i} pid {p.pid}", flush=True)
    t = threading.Thread(target=_pump, args=(p.stdout, f"p{i}", log), daemon=True)
    t.start()
    procs.append(p), pumps.append(t), logs.append(log)

  def forward(signum, _):
    print(f"launch/local.py: passing {signal.Signals(signum).name} to every process",
          flush=True)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)

  start, first_failure, failed_at = time.time(), None, None
  reported = set()
  while True:
    for i, p in enumerate(procs):
      code = p.poll()
      if code is not None and i not in reported:
        reported.add(i)
        print(f"launch/local.py: process {i} exited with {_describe(code)} after "
              f"{time.time() - start:.1f} s", flush=True)
        if code != 0 and first_failure is None:
          first_failure, failed_at = code, time.time()
    if len(reported) == len(procs):
      break
    if failed_at is not None and time.time() - failed_at > args.grace_s:
      for i, p in enumerate(procs):
        if p.poll() is None:
          print(f"launch/local.py: process {i} still running {args.grace_s:.0f} s after a "
                "peer failed; killing it", flush=True)
          p.kill()
      failed_at = float("inf")  # killed once; keep polling until all are reaped
    time.sleep(0.1)
  for t in pumps:
    t.join(timeout=5)
  for log in logs:
    log.close()
  if first_failure is None:
    return 0
  return 128 - first_failure if first_failure < 0 else first_failure


def parse(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      usage="%(prog)s [options] -- <arguments of python -m MODULE>")
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="simulated CPU devices (cpu) or GPUs (gpu) per process")
  parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--module", default="rvlm.main")
  parser.add_argument("--python", default=sys.executable)
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--heartbeat_timeout_s", type=int, default=0,
                      help="passed as RVLM_HEARTBEAT_TIMEOUT_S (0: rvlm's default)")
  parser.add_argument("--grace_s", type=float, default=120.0,
                      help="how long the others may take to stop after one failed")
  parser.add_argument("--log_dir", default=None, help="default: a temporary directory")
  parser.add_argument("--cwd", default=ROOT, help="working directory (configs/ is here)")
  parser.add_argument("--dry_run", action="store_true", help="print the commands only")
  if "--" in argv:
    cut = argv.index("--")
    own, command = argv[:cut], argv[cut + 1:]
  else:
    own, command = argv, []
  args = parser.parse_args(own)
  args.command = command
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num_processes and --devices_per_process must be >= 1")
  if not command:
    parser.error("nothing to run: give the module's arguments after --")
  return args


def main(argv):
  args = parse(argv)
  port = args.port or free_port()
  if args.dry_run:
    for changes, cmd in commands(args, port):
      env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(changes.items()))
      print(f"cd {shlex.quote(args.cwd)} && env {env} {shlex.join(cmd)}")
    return 0
  if args.log_dir is None:
    args.log_dir = tempfile.mkdtemp(prefix="rvlm_local_")
  print(f"launch/local.py: {args.num_processes} processes, coordinator 127.0.0.1:{port}, "
        f"logs in {args.log_dir}", flush=True)
  return run(args, port)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
