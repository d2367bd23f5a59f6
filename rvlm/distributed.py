"""Several processes as one job: JAX's multi-controller SPMD via jax.distributed.

Every process runs the same program (`python -m rvlm.main ...`, one per TPU host or
per GPU); `jax.distributed.initialize` connects them through a coordinator, after which
`jax.devices()` lists every device of the job, the mesh spans them all and each
process feeds its slice of the global batch (rvlm/data: a stride over the stream;
rvlm/sharding.make_global_batch). Nothing here is home-made: it only decides what to
pass to JAX.

Where the settings come from (the first that applies):
  1. flags of rvlm.main: --coordinator_address=HOST:PORT --num_processes=N --process_id=I
  2. the environment: RVLM_COORDINATOR_ADDRESS, RVLM_NUM_PROCESSES, RVLM_PROCESS_ID
     (launch/local.py sets these; launch/slurm/rvlm.sbatch passes the flags)
  3. JAX's own cluster detection (Cloud TPU pod metadata, SLURM, Open MPI, ...), with
     --distributed=on (launch/tpu/tpu.sh passes it), or with 'auto' when the
     environment says this is one of several tasks (SLURM_NTASKS > 1, a TPU pod's
     TPU_WORKER_HOSTNAMES listing several hosts).

A peer that dies is noticed through the coordination service's heartbeats: after
--heartbeat_timeout_s without one, every survivor is terminated by JAX with a message
naming the missing task (tests/test_multiprocess.py measures it). Lower it for quick
failure on flaky clusters; raise it for hosts that stall (long checkpoint writes).
"""
import dataclasses
import os

from absl import logging
import jax

MODES = ("auto", "on", "off")
ENV = {"coordinator_address": "RVLM_COORDINATOR_ADDRESS",
       "num_processes": "RVLM_NUM_PROCESSES",
       "process_id": "RVLM_PROCESS_ID",
       "heartbeat_timeout_s": "RVLM_HEARTBEAT_TIMEOUT_S"}
DEFAULT_HEARTBEAT_S = 100  # JAX's default


@dataclasses.dataclass(frozen=True)
class Settings:
  """What jax.distributed.initialize gets; None fields are left to JAX's detection."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_S
  initialization_timeout_s: int = 300


def _int(value, name):
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r} is not an integer") from None


def _several_tasks(environ):
  """Whether the environment describes a job of several processes."""
  if _int(environ.get("SLURM_NTASKS", "1") or "1", "SLURM_NTASKS") > 1:
    return True
  return len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def resolve(mode="auto", *, coordinator_address=None, num_processes=None, process_id=None,
            heartbeat_timeout_s=None, environ=None):
  """Settings to initialise with, or None for a single-process run.

  Flag values win over the environment's. Raises ValueError naming the problem for
  an incomplete or inconsistent explicit setting.
  """
  environ = os.environ if environ is None else environ
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r}: choose one of {MODES}")
  given = dict(coordinator_address=coordinator_address, num_processes=num_processes,
               process_id=process_id, heartbeat_timeout_s=heartbeat_timeout_s)
  values, source = {}, {}
  for key, value in given.items():
    if value is None and environ.get(ENV[key]):
      value, source[key] = environ[ENV[key]], ENV[key]
    else:
      source[key] = f"--{key}"
    values[key] = value
  for key in ("num_processes", "process_id", "heartbeat_timeout_s"):
    if values[key] is not None:
      values[key] = _int(values[key], source[key])
  explicit = [k for k in ("coordinator_address", "num_processes", "process_id")
              if values[k] is not None]
  if explicit and len(explicit) < 3:
    missing = sorted({"coordinator_address", "num_processes", "process_id"} - set(explicit))
    raise ValueError(f"multi-process settings are incomplete: {', '.join(explicit)} given "
                     f"but not {', '.join(missing)} (flags --NAME or env "
                     f"{', '.join(ENV[m] for m in missing)})")
  if explicit:
    n, i = values["num_processes"], values["process_id"]
    if n < 1:
      raise ValueError(f"{source['num_processes']}={n} must be >= 1")
    if not 0 <= i < n:
      raise ValueError(f"{source['process_id']}={i} must be in [0, {n}) "
                       f"({source['num_processes']}={n})")
    if ":" not in values["coordinator_address"]:
      raise ValueError(f"{source['coordinator_address']}={values['coordinator_address']!r} "
                       "must be HOST:PORT")
  heartbeat = values["heartbeat_timeout_s"] or DEFAULT_HEARTBEAT_S
  if heartbeat < 1:
    raise ValueError(f"{source['heartbeat_timeout_s']}={heartbeat} must be >= 1 second")
  if mode == "off":
    if explicit:
      raise ValueError("--distributed=off, but multi-process settings were given "
                       f"({', '.join(source[k] for k in explicit)})")
    return None
  if explicit:
    return Settings(values["coordinator_address"], values["num_processes"],
                    values["process_id"], heartbeat)
  if mode == "on" or _several_tasks(environ):
    return Settings(heartbeat_timeout_s=heartbeat)  # JAX detects the cluster
  return None


def initialize(settings):
  """Connects this process to the job's others (no-op for None)."""
  if settings is None:
    return
  logging.info("jax.distributed.initialize(%s)", ", ".join(
      f"{k}={v}" for k, v in dataclasses.asdict(settings).items() if v is not None))
  jax.distributed.initialize(
      coordinator_address=settings.coordinator_address,
      num_processes=settings.num_processes,
      process_id=settings.process_id,
      initialization_timeout=settings.initialization_timeout_s,
      heartbeat_timeout_seconds=settings.heartbeat_timeout_s)

