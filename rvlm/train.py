"""Training and per-depth evaluation: `train_and_evaluate(config, workdir)`.

One code path for 1 CPU, simulated devices and TPU pods: a mesh from config.mesh,
logical axis rules, params created already sharded, a jitted state-donating step.
Resume order: the workdir's latest good checkpoint > config.init_from (params only) >
fresh init.
"""
import dataclasses
import functools
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from absl import logging
from flax import linen as nn

from rvlm import checkpointing
from rvlm import data as data_lib
from rvlm import evaluate
from rvlm import generation_eval
from rvlm import inference
from rvlm import losses
from rvlm import metrics as metrics_lib
from rvlm import optim
from rvlm import sharding as sharding_lib
from rvlm import steps
from rvlm.convert import recursify
from rvlm.models import vlm
from rvlm.utils import machine


class NonFiniteLossError(FloatingPointError):
  """The loss or gradients became NaN/Inf (config.train.nan_policy='stop')."""


class _StopSignal:
  """SIGTERM / SIGINT: the loop saves a checkpoint and exits cleanly.

  One process: Python handlers set a flag. Several processes must stop at the same
  step (the save is collective), though a signal may reach only some of them: JAX's
  preemption service (started by jax.distributed.initialize) catches SIGTERM in any
  process and agrees on a step where all stop (`reached_preemption_sync_point`). A
  Python SIGTERM handler would replace its own, so there only SIGINT gets one, which
  passes the signal on as SIGTERM.
  """

  def __init__(self):
    self.received = None
    self._previous = {}
    self._several = jax.process_count() > 1

  def __enter__(self):
    handlers = ({signal.SIGINT: self._to_sigterm} if self._several else
                {signal.SIGTERM: self._handle, signal.SIGINT: self._handle})
    for sig, handler in handlers.items():
      try:
        self._previous[sig] = signal.signal(sig, handler)
      except ValueError:  # not the main thread (e.g. some test runners): no handler
        pass
    return self

  def _handle(self, signum, _):
    self.received = signal.Signals(signum).name
    logging.warning("received %s: saving a checkpoint and stopping", self.received)

  def _to_sigterm(self, *_):
    os.kill(os.getpid(), signal.SIGTERM)

  def check(self, step):
    """The signal's name once every process is to stop at `step`, else None."""
    if (self.received is None and self._several
        and multihost_utils.reached_preemption_sync_point(step)):
      self.received = "SIGTERM"
      logging.warning("a process received SIGTERM: all save a checkpoint at step %d and "
                      "stop", step)
    return self.received

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def check_config(config):
  vlm.check_model_config(config.model)
  eval_depth(config)
  losses.check_loss_config(config.loss, config.model.recursion.num_steps)
  t = config.train
  for field in ("total_steps", "log_every", "eval_every", "checkpoint_every",
                "keep_checkpoints", "grad_accum_steps"):
    if int(t[field]) < 1:
      raise ValueError(f"config.train.{field}={t[field]} must be >= 1")
  if config.data.batch_size % t.grad_accum_steps:
    raise ValueError(f"config.data.batch_size={config.data.batch_size} is not divisible by "
                     f"config.train.grad_accum_steps={t.grad_accum_steps}")
  if t.checkpoint_every % t.log_every:
    logging.warning("config.train.checkpoint_every=%d is not a multiple of log_every=%d: a "
                    "resumed run's first logged window will differ from an uninterrupted one",
                    t.checkpoint_every, t.log_every)
  if t.nan_policy not in ("stop", "skip"):
    raise ValueError(f"config.train.nan_policy={t.nan_policy!r}: choose 'stop' or 'skip'")


def eval_depth(config):
  """Depths evaluated: 1..R, or 1..config.eval.max_depth (> R: depth extrapolation)."""
  r = int(config.model.recursion.num_steps)
  max_depth = int(config.eval.get("max_depth", 0) or 0)
  if max_depth and (max_depth < r or (config.model.recursion.mode == "none" and max_depth > 1)):
    raise ValueError(f"config.eval.max_depth={max_depth} must be 0 (= R) or >= "
                     f"config.model.recursion.num_steps={r}, and 0 or 1 for mode 'none'")
  return max_depth or r


def dummy_batch(config, batch_size):
  """Zeros of the batch contract's shapes: enough to build params and shardings."""
  s, t = config.model.vit.image_size, config.data.seq_len
  return {"image": jnp.zeros((batch_size, s, s, 3), jnp.float32),
          "image_mask": jnp.ones((batch_size,), jnp.int32),
          **{k: jnp.zeros((batch_size, t), jnp.int32)
             for k in ("tokens", "input_mask", "mask_ar", "mask_loss")}}


def init_train_state(rng, *, model, tx, config):
  """A fresh train state {params, opt_state, step, rng}, params still boxed with their
  logical names (sharding_lib derives shardings from them)."""
  params_rng, state_rng = jax.random.split(rng)
  params = model.init(params_rng, dummy_batch(config, 1))["params"]
  return {"params": params, "opt_state": tx.init(params),
          "step": jnp.zeros((), jnp.int32), "rng": state_rng}


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """What `build_train_step` makes: the trainer's step and the state it runs on.

  `abstract` holds ShapeDtypeStructs carrying `.sharding` (no array is created);
  `train_fn(state, batch) -> (state, metrics)` is jitted with the state donated.
  """
  model: Any
  tx: Any
  lr_schedule: Callable
  init_state: Callable      # rng -> boxed train state (see init_train_state)
  rng: Any                  # the key `abstract` was derived from; init_state(rng) = state
  abstract: Any
  state_shardings: Any
  batch_sharding: Any
  train_fn: Callable


def build_train_step(config, mesh, rules):
  """The model, optimizer, state shardings and jitted train step for `config` on `mesh`.

  Creates no arrays beyond the PRNG key: the trainer initialises or restores the state
  itself, and rvlm.compile_check lowers `train_fn` on `abstract` alone, so both use
  exactly this step.
  """
  model = vlm.make_model(config.model)
  tx, lr_schedule = optim.make_optimizer(config.optim, int(config.train.total_steps))
  init_state = functools.partial(init_train_state, model=model, tx=tx, config=config)
  rng = jax.random.PRNGKey(config.seed)
  abstract, state_shardings = sharding_lib.abstract_state_and_shardings(init_state, mesh, rules, rng)
  repl = sharding_lib.replicated(mesh)
  batch_sharding = sharding_lib.data_sharding(mesh)
  train_fn = jax.jit(
      functools.partial(steps.train_step, model=model, tx=tx, lr_schedule=lr_schedule,
                        loss_cfg=config.loss, accum=config.train.grad_accum_steps,
                        skip_nonfinite=config.train.nan_policy == "skip"),
      in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, repl),
      donate_argnums=(0,))
  return TrainStep(model=model, tx=tx, lr_schedule=lr_schedule, init_state=init_state,
                   rng=rng, abstract=abstract, state_shardings=state_shardings,
                   batch_sharding=batch_sharding, train_fn=train_fn)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains per `config`, evaluating every depth periodically and at the end.

  Returns the final results dict (also written to workdir/results.json).
  """
  os.makedirs(workdir, exist_ok=True)
  # A pretrained (imported) model: its architecture and tokenizer come from init_from.
  config = recursify.resolve_from_init(config)
  # Own data: tokenizer 'auto' and seq_len 0 are settled from the data, once per workdir.
  config = data_lib.resolve.resolve(config, workdir)
  check_config(config)
  total_steps = int(config.train.total_steps)

  # ---- mesh ----------------------------------------------------------------------
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config.mesh)
  sharding_lib.check_batch_size(config.data.batch_size, mesh)
  logging.info("mesh %s on %d devices (%d processes)", dict(mesh.shape), jax.device_count(),
               jax.process_count())
  if jax.default_backend() == "cpu":
    malloc = machine.malloc_library()
    logging.info("malloc: %s%s", malloc, " (tcmalloc through LD_PRELOAD can make CPU "
                 "steps faster: README, 'Install and run')" if malloc == "glibc" else "")

  # ---- data ----------------------------------------------------------------------
  train_iter = data_lib.build_train_iterator(config, jax.process_index(), jax.process_count())
  eval_splits = {
      split: data_lib.build_eval_batches(config, split, config.eval.batch_size,
                                         config.eval.num_examples, jax.process_index(),
                                         jax.process_count())
      for split in config.eval.splits}
  family_names = data_lib.family_names(config)
  bucket_lengths = data_lib.buckets.boundaries(config.data)

  def next_batch():
    local = next(train_iter)
    if bucket_lengths:  # cut the text padding to a bucket length (same in every process)
      local = data_lib.buckets.trim(local, data_lib.buckets.global_length(local, bucket_lengths))
    return sharding_lib.make_global_batch(local, mesh)
  use_curriculum = data_lib.curriculum.check_config(config) is not None

  # ---- model, optimizer, shardings and train step --------------------------------
  built = build_train_step(config, mesh, rules)
  model, tx, train_fn = built.model, built.tx, built.train_fn
  abstract, state_shardings = built.abstract, built.state_shardings
  _, param_count = metrics_lib.log_parameter_overview(abstract["params"])
  logging.info("parameters: %d", param_count)

  # ---- checkpoint load -----------------------------------------------------------
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir),
                                    keep=config.train.keep_checkpoints, config=config)
  if ckpt.latest_step() is not None:
    state, data_state, first_step = ckpt.restore(abstract)
    if data_state is not None:
      train_iter.set_state(data_state)
    logging.info("resumed from %s at step %d", ckpt.directory, first_step)
  else:
    state = sharding_lib.init_sharded(built.init_state, state_shardings, mesh, rules,
                                      built.rng)
    first_step = 0
    if config.init_from:
      params = checkpointing.load_params(config.init_from, abstract["params"],
                                         fresh_params=state["params"],
                                         allow_new=tuple(config.get("init_from_allow_new", ())))
      state = dict(state, params=params,
                   opt_state=jax.jit(tx.init, out_shardings=state_shardings["opt_state"])(params))
      logging.info("initialised params from %s", config.init_from)

  # ---- evaluation step -----------------------------------------------------------
  repl, batch_sharding = sharding_lib.replicated(mesh), built.batch_sharding
  trained_depth = int(config.model.recursion.num_steps)
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=model,
                                      num_steps=eval_depth(config)),
                    in_shardings=(state_shardings["params"], batch_sharding), out_shardings=repl)

  def check_curriculum(step):
    """Raises the curriculum level when the model has learned the current one."""
    batches = train_iter.probe_batches(config.eval.batch_size)
    logging.info("step %d: curriculum probe at h = %d (%s, depths 1..%d)", step,
                 train_iter.level, _eval_size(batches), eval_depth(config))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      res = evaluate.evaluate_split(eval_fn, state["params"], batches, mesh, family_names)
    level = train_iter.level
    acc = res["accuracy_by_depth"][str(trained_depth)]
    raised = train_iter.update(acc)
    writer.write_scalars(step, {"curriculum/accuracy_at_level": acc,
                                "curriculum/level": float(train_iter.level)})
    logging.info("step %d curriculum: accuracy %.3f at h = %d%s", step, acc, level,
                 f" -> level {train_iter.level}" if raised else "")

  def run_evals(step):
    results = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      for split, batches in eval_splits.items():
        logging.info("step %d: evaluating %s (%s, depths 1..%d)", step, split,
                     _eval_size(batches), eval_depth(config))
        results[split] = evaluate.evaluate_split(eval_fn, state["params"], batches, mesh, family_names)
    for split, res in results.items():
      writer.write_scalars(step, evaluate.scalars(split, res))
      logging.info("step %d %s accuracy by depth %s (majority %.3f)", step, split,
                   {d: round(a, 4) for d, a in res["accuracy_by_depth"].items()},
                   res["majority_baseline"])
    return results

  # ---- loop ----------------------------------------------------------------------
  writer = metrics_lib.MetricWriter(workdir)
  if first_step == 0:
    writer.write_hparams({**config.to_dict(), "param_count": param_count})
  progress = metrics_lib.ProgressReporter(total_steps, config.data.batch_size,
                                          config.train.log_every)
  acc = None
  step = first_step
  window_start = step + 1  # first step of the current logging window
  with _StopSignal() as stop, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    while step < total_steps:
      batch = next_batch()
      dispatched = time.perf_counter()
      state, step_metrics = train_fn(state, batch)
      step += 1
      if step == first_step + 1:  # this call compiled; wait for its result to time both
        jax.block_until_ready(step_metrics)
        logging.info("first train step (compile + run): %.1f s",
                     time.perf_counter() - dispatched)
      acc = metrics_lib.merge_metrics(acc, step_metrics)
      progress(step, ready=step_metrics)
      if use_curriculum and train_iter.due(step):  # before any save: the level is data state
        check_curriculum(step)
      stopping = stop.check(step)
      save_now = (step % config.train.checkpoint_every == 0 or step == total_steps
                  or stopping)
      if step % config.train.log_every == 0 or step == total_steps or save_now:
        scalars = metrics_lib.compute_metrics(acc)
        if scalars["nonfinite"] > 0:  # checked before any save: never save a NaN state
          _handle_nonfinite(config, window_start, step, scalars, ckpt)
      if step % config.train.log_every == 0 or step == total_steps:
        acc, window_start = None, step + 1
        scalars.update(progress.metrics())
        scalars.update({f"data/skipped/{k}": v for k, v in data_lib.skip_counts().items()})
        writer.write_scalars(step, scalars)
        alpha = scalars.get("connector/alpha_mean_abs")
        if alpha is not None and alpha < 1e-3:
          logging.warning("connector residual scale |alpha| = %.2e: recursion has switched "
                          "itself off", alpha)
      if save_now:
        writer.flush()  # logs up to this step reach disk before the checkpoint does
        ckpt.save(step, state, train_iter.get_state(), force=True)
      if step % config.train.eval_every == 0 and step != total_steps:
        run_evals(step)
      if stopping:
        ckpt.close()
        writer.close()
        logging.info("stopped by %s at step %d; checkpoint saved", stop.received, step)
        return None

  # ---- final evaluation ----------------------------------------------------------
  results = run_evals(step)
  primary = "test" if "test" in results else next(iter(results))
  if config.eval.get("generated", True):  # the primary split only: it costs a decode per depth
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      add_generated_exact_match(config, model, state["params"], eval_splits[primary],
                                results[primary], family_names, split=primary)
  payload = evaluate.write_results(workdir, step, results, primary) if jax.process_index() == 0 else None
  ckpt.close()
  writer.close()
  if hasattr(train_iter, "close"):
    train_iter.close()
  return payload


def add_generated_exact_match(config, model, params, batches, result, family_names,
                              split="eval"):
  """Adds free-running (greedy, rvlm/decode.py) exact match and token F1 at every
  evaluated depth beside the teacher-forced figures of one split's `result`."""
  if jax.process_count() > 1:  # eval batches are per process; decoding them is not
    logging.info("generated exact match: single-process runs only; use python -m rvlm.evaluate")
    return
  loaded = inference.Loaded(config=config, model=model, params=params,
                            tokenizer=data_lib.get_tokenizer(config.data), step=0,
                            workdir="")
  max_new = generation_eval.default_max_new_tokens(batches, loaded.tokenizer.eos_id)
  logging.info("generated exact match: decoding %s (%s, depths 1..%d, up to %d new tokens)",
               split, _eval_size(batches), eval_depth(config), max_new)
  out = generation_eval.evaluate(loaded, batches, depths=range(1, eval_depth(config) + 1),
                                 thresholds=(), max_new_tokens=max_new,
                                 family_names=family_names)
  field = lambda key: {d: res[key] for d, res in out["by_depth"].items()}  # noqa: E731
  em = field("exact_match")
  result["generated_exact_match_by_depth"] = em
  result["generated_f1_by_depth"] = field("f1")
  # Free-text answers: VQA-style normalisation (case, punctuation, articles, number
  # words; rvlm/answers.py), with the majority baseline computed the same way.
  result["normalised_exact_match_by_depth"] = field("normalised_exact_match")
  result["normalised_majority_baseline"] = out["normalised_majority_baseline"]
  logging.info("generated (greedy) exact match by depth %s",
               {d: round(a, 4) for d, a in em.items()})


def _eval_size(batches):
  """'N examples in B batches': real rows (example_mask 1), not the last batch's padding."""
  n = sum(int(np.sum(b["example_mask"])) for b in batches)
  # Eval batches are per process; counting the others' rows would need a collective.
  where = " on this process" if jax.process_count() > 1 else ""
  return f"{n} examples{where} in {len(batches)} batch{'es' if len(batches) != 1 else ''}"


def _handle_nonfinite(config, first, last, scalars, ckpt):
  where = f"step {last}" if first == last else f"steps {first}-{last}"
  if config.train.nan_policy == "skip":
    logging.warning("non-finite loss or gradients in %s: those updates were skipped", where)
    return
  ckpt.wait()
  raise NonFiniteLossError(
      f"non-finite loss or gradients in {where} (loss={scalars['loss']}, "
      f"grad_norm={scalars['grad_norm']}); stopping without saving. The last good "
      f"checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is untouched. "
      "Lower config.optim.lr or set config.train.nan_policy='skip'.")
