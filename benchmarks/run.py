"""Every performance benchmark in one run, against this machine's own limits.

  python -m benchmarks.run --out=/tmp/bench [--quick] [--only=peak,train,torch,...]

Sections (docs/performance.md has the tables of a full run and what they mean):
  peak      f32 / bf16 matmul GFLOP/s at a large square size (jax and torch): the limit
  train     the trainer's step per preset x dtype: examples/s, tokens/s, matmul
            GFLOP/s (rvlm/flops.py, every scan iteration counted) and MFU = that / peak
  torch     a plain-PyTorch copy of the same model, loss and AdamW
            (benchmarks/torch_reference.py), checked to compute rvlm's loss on the same
            batch before it is timed, eager and under torch.compile
  remat     each --remat_presets preset's step (small by default) under each remat
            setting and recursion impl (R = 3)
  scaling   compile and step time for R = 1, 2, 4, 8, recursion under scan and loop
  memory    the compiled step's temp memory for R = 1..8 with each remat setting, and
            the peak RSS of a process running that step
  decode    cached decode latency at each depth: per further token (the goal's
            figure) and the first token's (image + prompt prefill)
  pipeline  the input pipeline's examples/s against the trainer's consumption
Machines of this kind differ by 30-50% in speed and are noisy, so every comparison is
a ratio within one run. `DIR/summary.json` holds the headline ratios and the goals,
`DIR/results.json` every figure.
"""
import functools
import itertools
import json
import os
import sys
import tempfile

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import common  # noqa: E402
from benchmarks import train_step  # noqa: E402
from configs import base  # noqa: E402

SECTIONS = ("peak", "train", "torch", "remat", "scaling", "memory", "decode", "pipeline")
flags.DEFINE_string("out", None, "Directory for summary.json and results.json.")
flags.DEFINE_bool("quick", False, "Fewer sizes and repeats: a smoke run of every section "
                  "(its figures are noisier; the goals are judged on a full run).")
flags.DEFINE_list("only", list(SECTIONS), f"Sections to run, of {SECTIONS}.")
flags.DEFINE_list("presets", ["small", "medium"],
                  "Presets of the train, torch and decode sections.")
flags.DEFINE_list("remat_presets", ["small"],
                  "Presets of the remat section (medium adds minutes per setting).")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes of the train section.")
flags.DEFINE_integer("batch", 0, "Batch size of the train / torch sections (0: per preset).")
flags.DEFINE_integer("peak_size", 0, "n of the peak section's n x n matmul (0: 2048, 1024 "
                     "with --quick).")
flags.DEFINE_integer("threads", 0, "torch threads (0: os.cpu_count(), as XLA uses).")
FLAGS = flags.FLAGS

# Per-preset batch: small is configs/base.py's default; medium's steps take seconds on
# two cores at 64, so it uses 16 (the same batch for rvlm and torch either way).
BATCH = {"tiny": 64, "small": 64, "medium": 16, "1b": 8, "3b": 4}
# Remat settings: (config.model.remat_policy, per decoder layer; recursion.remat, per step).
REMAT = {"none": ("none", False), "dots": ("dots", False), "full": ("full", False),
         "step": ("none", True), "step+dots": ("dots", True)}


def preset_config(preset, dtype="float32", batch=0, **model):
  """configs/base.py with `preset`; `model` overrides config.model fields ('a.b': v)."""
  config = base.get_config(f"preset={preset}")
  config.model.dtype = dtype
  config.data.batch_size = batch or BATCH.get(preset, 8)
  for key, value in model.items():
    node = config.model
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


# ---- peak ---------------------------------------------------------------------------
def matmul_peak(quick):
  """GFLOP/s of an n x n matmul, jax and torch, f32 and bf16; the limit is the larger."""
  n = FLAGS.peak_size or (1024 if quick else 2048)
  repeats = 5 if quick else 10
  out = {"n": n}
  for dtype in ("float32", "bfloat16"):
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(jnp.dot)
    s, _ = common.timed(lambda: f(a, a).block_until_ready(), repeats, max_s=30)  # noqa: B023
    out[f"jax_{dtype}"] = 2 * n ** 3 / s / 1e9
    try:
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(FLAGS.threads or os.cpu_count())
      # torch's bf16 matmul without native bf16 GEMMs runs at ~1 GFLOP/s at 1024 and
      # ~0.3 at 2048 (a minute per call): measured at 1024, it cannot be the limit anyway.
      tn = n if dtype == "float32" else min(n, 1024)
      t = torch.randn(tn, tn, dtype=getattr(torch, dtype))
      s, _ = common.timed(lambda: torch.mm(t, t), repeats, max_s=30)  # noqa: B023
      out[f"torch_{dtype}"] = 2 * tn ** 3 / s / 1e9
      out[f"torch_{dtype}_n"] = tn
    except ImportError:
      pass
    out[dtype] = max(v for k, v in out.items() if k in (f"jax_{dtype}", f"torch_{dtype}"))
  return out


# ---- train --------------------------------------------------------------------------
def train_section(peak, quick):
  rows = {}
  for preset in FLAGS.presets:
    for dtype in FLAGS.dtypes:
      config = preset_config(preset, dtype, FLAGS.batch)
      r = train_step.measure(config, iters=3 if quick else 10)
      r["mfu"] = r["gflops_per_s"] / peak[dtype]
      rows[f"{preset}/{dtype}"] = r
      print(f"  {preset:<7} {dtype:<9} batch {r['batch']:>3}  {r['params'] / 1e6:6.2f}M params  "
            f"compile {r['compile_s']:5.1f} s  step {1e3 * r['step_s']:8.1f} ms  "
            f"{r['examples_per_s']:7.1f} ex/s  {r['tokens_per_s']:8.0f} tok/s  "
            f"{r['gflops_per_s']:6.1f} GFLOP/s  MFU {100 * r['mfu']:5.1f}%", flush=True)
  return rows


# ---- torch --------------------------------------------------------------------------
def torch_section(train_rows, quick):
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  rows = {}
  for preset in FLAGS.presets:
    config = preset_config(preset, "float32", FLAGS.batch)
    rvlm_rate = train_rows.get(f"{preset}/float32", {}).get("examples_per_s")
    if rvlm_rate is None:
      rvlm_rate = train_step.measure(config, iters=3 if quick else 10)["examples_per_s"]
    r = torch_reference.benchmark(config, iters=3 if quick else 10,
                                  threads=FLAGS.threads or os.cpu_count())
    r["rvlm_examples_per_s"] = rvlm_rate
    for mode in ("eager", "compile"):
      rate = r[mode].get("examples_per_s")
      r[mode]["rvlm_ratio"] = rvlm_rate / rate if rate else None
    rows[preset] = r
    print(f"  {preset:<7} loss check |rvlm - torch| = {r['loss_diff']:.2e}  rvlm "
          f"{rvlm_rate:7.1f} ex/s | torch eager {_rate(r['eager'])} | torch.compile "
          f"{_rate(r['compile'])}", flush=True)
  return rows


def _rate(row):
  if row.get("examples_per_s") is None:
    return f"failed ({row.get('error', '?')})"
  return f"{row['examples_per_s']:7.1f} ex/s (rvlm {row['rvlm_ratio']:.2f}x)"


# ---- remat --------------------------------------------------------------------------
def remat_section(peak, quick, presets):
  """What saving fewer activations buys on this machine: the profile of the default
  step (docs/performance.md) is dominated by writing, zero-filling and reading the
  scans' stacked residuals, not by the matmuls. {preset: {impl/setting: figures}}."""
  rows = {}
  for preset, impl, (name, (policy, step_remat)) in itertools.product(
      presets, ("scan", "loop"), REMAT.items()):
    config = preset_config(preset, **{"remat_policy": policy, "recursion.remat": step_remat,
                                      "recursion.impl": impl})
    m = train_step.measure(config, iters=3 if quick else 10)
    m["mfu"] = m["gflops_per_s"] / peak["float32"]
    rows.setdefault(preset, {})[f"{impl}/{name}"] = m
    print(f"  {preset:<7} {impl:<4} remat {name:<9}  step {1e3 * m['step_s']:7.1f} ms  "
          f"{m['examples_per_s']:6.1f} ex/s  MFU {100 * m['mfu']:5.1f}%  executed "
          f"{m['executed_flops'] / m['flops']:.2f}x the model's FLOPs  temp "
          f"{m['memory']['temp'] / 2**20:6.1f} MiB", flush=True)
  return rows


# ---- scaling ------------------------------------------------------------------------
def scaling_section(quick):
  rows = {}
  for impl in ("scan", "loop"):
    for r_steps in ((1, 8) if quick else (1, 2, 4, 8)):
      config = preset_config("small", **{"recursion.num_steps": r_steps,
                                         "recursion.impl": impl})
      m = train_step.measure(config, iters=2 if quick else 5)
      rows[f"{impl}/R{r_steps}"] = dict(compile_s=m["compile_s"], step_s=m["step_s"],
                                        flops=m["flops"])
      print(f"  {impl:<4} R={r_steps}  compile {m['compile_s']:5.1f} s  step "
            f"{1e3 * m['step_s']:7.1f} ms  {m['flops'] / 1e9:7.2f} GFLOP", flush=True)
  return rows


# ---- memory -------------------------------------------------------------------------


def memory_section(quick, log_dir):
  """Compiled temp bytes for each R and remat setting, and the peak RSS of a child
  process running that step (R = 1 and 8). Under the outer scan, whatever the
  preset's impl: recursion-level remat bounds memory in R there (the memory goal), and
  the figures stay comparable with earlier runs."""
  rows = {}
  depths = (1, 8) if quick else tuple(range(1, 9))
  for name, (policy, step_remat) in REMAT.items():
    for r_steps in depths:
      overrides = {"recursion.num_steps": r_steps, "remat_policy": policy,
                   "recursion.remat": step_remat, "recursion.impl": "scan"}
      m = train_step.measure(preset_config("small", **overrides), run=False)
      row = dict(temp_bytes=m["memory"]["temp"], executed_flops=m["executed_flops"])
      if r_steps in (1, 8) and name in ("none", "step"):
        args = [sys.executable, os.path.join(REPO, "benchmarks", "train_step.py"),
                "--iters=2", f"--config={os.path.join(REPO, 'configs', 'base.py')}"]
        args += [f"--config.model.{k}={v}" for k, v in overrides.items()]
        child = common.run_child(args, log_dir, f"rss_{name}_R{r_steps}")
        if child["rc"]:
          raise RuntimeError(f"{' '.join(args)} failed:\n{child['stderr'][-3000:]}")
        row["peak_rss_bytes"] = child["peak_rss_bytes"]
      rows[f"{name}/R{r_steps}"] = row
      rss = (f"  peak RSS {row['peak_rss_bytes'] / 2**20:7.1f} MiB"
             if "peak_rss_bytes" in row else "")
      print(f"  remat {name:<9} R={r_steps}  temp {row['temp_bytes'] / 2**20:7.2f} MiB  "
            f"{row['executed_flops'] / 1e9:7.2f} GFLOP executed{rss}", flush=True)
  return rows


# ---- decode -------------------------------------------------------------------------
def decode_section(quick):
  """Cached per-token latency at depth 1..2R for each of --presets (random params)."""
  return {preset: _decode_latency(preset, quick) for preset in FLAGS.presets}


def _decode_latency(preset, quick):
  """Per depth: the first token's latency (image encoding + the prompt's prefill at every
  step + one token) and the time per further token, (T(1 + n) - T(1)) / n, which is what
  the goal is judged on; the prefill is a fixed cost per answer, not a per-token one."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from rvlm import data as data_lib  # pylint: disable=g-import-not-at-top
  from rvlm import decode  # pylint: disable=g-import-not-at-top
  from rvlm import generation_eval  # pylint: disable=g-import-not-at-top
  from rvlm import train  # pylint: disable=g-import-not-at-top
  from rvlm.models import vlm  # pylint: disable=g-import-not-at-top
  config = preset_config(preset)
  model = vlm.make_model(config.model)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0),
                                        train.dummy_batch(config, 1))["params"])
  tok = data_lib.get_tokenizer(config.data)
  examples = data_lib.build_eval_batches(config, "val", 1, 1)
  batch = generation_eval.prompt_batch(examples[0], generation_eval.max_prompt_length(examples),
                                       tok.eos_id)
  # As predict / evaluate decode: the params sliced into the decoding layout once.
  params = decode.prepare_params(params)
  new_tokens, repeats = (16, 3) if quick else (64, 10)
  depths = range(1, 2 * int(config.model.recursion.num_steps) + 1)
  # eos_id = vocab_size: never generated, so every run makes exactly the tokens asked.
  gen = {(depth, n): functools.partial(decode.generate, model, params, batch, depth=depth,
                                       max_new_tokens=n, eos_id=int(config.model.vocab_size))
         for depth in depths for n in (1, 1 + new_tokens)}
  for f in gen.values():                       # compile everything before timing any
    jax.block_until_ready(f().tokens)
  # Every (depth, length) once per round, so that a slow spell of the machine hits all
  # depths alike: the ratios divide by depth 1's time, measured in the same rounds.
  times = {key: [] for key in gen}
  for _ in range(repeats):
    for key, f in gen.items():
      times[key].append(common.timed(lambda: jax.block_until_ready(f().tokens),  # noqa: B023
                                     1, warmup=0)[0])
  rows = {}
  for depth in depths:
    first, whole = (float(np.median(times[depth, n])) for n in (1, 1 + new_tokens))
    rows[depth] = dict(first_token_ms=1e3 * first,
                       ms_per_token=1e3 * (whole - first) / new_tokens,
                       ms_per_token_with_prefill=1e3 * whole / (1 + new_tokens))
  base = rows[1]
  for depth, row in rows.items():
    row["ratio_to_depth_x_r1"] = row["ms_per_token"] / (depth * base["ms_per_token"])
    row["ratio_with_prefill"] = (row["ms_per_token_with_prefill"]
                                 / (depth * base["ms_per_token_with_prefill"]))
    print(f"  {preset:<7} depth {depth}  {row['ms_per_token']:7.2f} ms/token  = "
          f"{row['ratio_to_depth_x_r1']:.2f} x (depth x depth 1's) | first token "
          f"{row['first_token_ms']:7.2f} ms | prefill spread over the tokens "
          f"{row['ms_per_token_with_prefill']:7.2f} ms/token = {row['ratio_with_prefill']:.2f} x",
          flush=True)
  return rows


# ---- pipeline -----------------------------------------------------------------------
def pipeline_section(train_rows, quick):
  from benchmarks import data_throughput  # pylint: disable=g-import-not-at-top
  config = preset_config("small")
  consume = train_rows.get("small/float32", {}).get("examples_per_s")
  if consume is None:
    consume = train_step.measure(config, iters=3 if quick else 10)["examples_per_s"]
  rate = data_throughput.measure(config, 10 if quick else 60, 5)
  print(f"  num_workers={config.data.num_workers}: {rate:8.0f} examples/s; the trainer "
        f"consumes {consume:.0f} examples/s: {rate / consume:.1f}x", flush=True)
  return dict(num_workers=int(config.data.num_workers), examples_per_s=rate,
              trainer_examples_per_s=consume, ratio=rate / consume)


# ---- summary ------------------------------------------------------------------------
def summarise(res):
  """The headline figures and the issue's goals, each with its measured value."""
  s = {}
  if "peak" in res:
    s["peak_gflops"] = {d: res["peak"][d] for d in ("float32", "bfloat16")}
  if "train" in res:
    s["mfu"] = {k.split("/")[0]: v["mfu"] for k, v in res["train"].items()
                if k.endswith("/float32")}
    s["mfu_bf16"] = {k.split("/")[0]: v["mfu"] for k, v in res["train"].items()
                     if k.endswith("/bfloat16")}
  if "torch" in res:
    s["torch_eager_ratio"] = {p: r["eager"]["rvlm_ratio"] for p, r in res["torch"].items()}
    s["torch_compile_ratio"] = {p: r["compile"]["rvlm_ratio"] for p, r in res["torch"].items()}
  if "remat" in res:  # the fastest setting per preset, and its speed-up over scan/none
    s["fastest_remat_setting"] = {}
    for preset, rows in res["remat"].items():
      best = min(rows.items(), key=lambda kv: kv[1]["step_s"])
      s["fastest_remat_setting"][preset] = dict(
          setting=best[0], mfu=best[1]["mfu"],
          speedup=rows["scan/none"]["step_s"] / best[1]["step_s"])
  if "scaling" in res:
    sc = res["scaling"]
    s["compile_ratio_r8"] = sc["scan/R8"]["compile_s"] / sc["scan/R1"]["compile_s"]
    s["step_ratio_r8"] = sc["scan/R8"]["step_s"] / sc["scan/R1"]["step_s"]
  if "memory" in res:
    mem = res["memory"]
    s["memory_ratio_r8"] = mem["step/R8"]["temp_bytes"] / mem["step/R1"]["temp_bytes"]
    s["memory_ratio_r8_no_remat"] = mem["none/R8"]["temp_bytes"] / mem["none/R1"]["temp_bytes"]
  if "pipeline" in res:
    s["pipeline_ratio"] = res["pipeline"]["ratio"]
  if "decode" in res:
    s["decode_latency_ratio_by_depth"] = {
        p: {str(d): r["ratio_to_depth_x_r1"] for d, r in rows.items()}
        for p, rows in res["decode"].items()}
  goals = []

  def goal(name, value, ok):
    if value is not None:
      goals.append(dict(goal=name, value=value, met=bool(ok(value))))
  for preset, want in (("medium", 0.8), ("small", 0.5)):
    goal(f"{preset} train step MFU >= {want:.0%} (f32, R = 3)", s.get("mfu", {}).get(preset),
         lambda v, w=want: v >= w)
  for preset, want in (("small", 1.5), ("medium", 1.0)):
    goal(f"{preset}: rvlm / torch eager >= {want}", s.get("torch_eager_ratio", {}).get(preset),
         lambda v, w=want: v >= w)
  for preset in ("small", "medium"):
    goal(f"{preset}: rvlm / torch.compile >= 1.0", s.get("torch_compile_ratio", {}).get(preset),
         lambda v: v >= 1.0)
  goal("compile time R=8 / R=1 <= 1.5 (scan)", s.get("compile_ratio_r8"), lambda v: v <= 1.5)
  goal("activation memory R=8 / R=1 <= 2 (recursion-level remat)", s.get("memory_ratio_r8"),
       lambda v: v <= 2)
  goal("data pipeline >= 5x the trainer's consumption", s.get("pipeline_ratio"),
       lambda v: v >= 5)
  for preset, by_depth in s.get("decode_latency_ratio_by_depth", {}).items():
    for d, v in by_depth.items():
      goal(f"{preset}: decode latency at depth {d} within 10% of {d} x depth 1's", v,
           lambda v: abs(v - 1) <= 0.1)
  s["goals"] = goals
  return s


def main(argv):
  del argv
  if not FLAGS.out:
    raise app.UsageError("--out=DIR is required")
  unknown = set(FLAGS.only) - set(SECTIONS)
  if unknown:
    raise app.UsageError(f"--only: unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
  os.makedirs(FLAGS.out, exist_ok=True)
  m = common.machine()
  print(f"machine: {m['cpu']} ({' '.join(m['isa']) or 'ISA unknown'}), {m['cores']} cores, "
        f"malloc {m['malloc']} | jax {m['jax']}, torch {m['torch']} | "
        f"{jax.default_backend()} x{jax.device_count()} | {m['date']}"
        + (" | --quick" if FLAGS.quick else ""), flush=True)
  res = {"machine": m, "quick": FLAGS.quick}
  need_peak = {"peak", "train", "remat"} & set(FLAGS.only)
  with tempfile.TemporaryDirectory(prefix="rvlm_bench_") as log_dir:
    for section in SECTIONS:
      if section not in FLAGS.only and not (section == "peak" and need_peak):
        continue
      print(f"\n== {section}", flush=True)
      if section == "peak":
        res["peak"] = matmul_peak(FLAGS.quick)
        p = res["peak"]
        print("  " + "  ".join(f"{k} {v:.1f}" for k, v in p.items()
                           if k != "n" and not k.endswith("_n"))  # sizes, not rates
              + f" GFLOP/s ({p['n']}x{p['n']} matmul)", flush=True)
      elif section == "train":
        res["train"] = train_section(res["peak"], FLAGS.quick)
      elif section == "torch":
        res["torch"] = torch_section(res.get("train", {}), FLAGS.quick)
      elif section == "remat":
        res["remat"] = remat_section(res["peak"], FLAGS.quick, FLAGS.remat_presets)
      elif section == "scaling":
        res["scaling"] = scaling_section(FLAGS.quick)
      elif section == "memory":
        res["memory"] = memory_section(FLAGS.quick, log_dir)
      elif section == "decode":
        res["decode"] = decode_section(FLAGS.quick)
      elif section == "pipeline":
        res["pipeline"] = pipeline_section(res.get("train", {}), FLAGS.quick)
  summary = summarise(res)
  summary["machine"] = m
  summary["quick"] = FLAGS.quick
  print("\n== goals")
  for g in summary["goals"]:
    print(f"  [{'met' if g['met'] else 'NOT met'}] {g['goal']}: {g['value']:.3g}")
  with open(os.path.join(FLAGS.out, "results.json"), "w") as f:
    json.dump(res, f, indent=2, default=float)
  with open(os.path.join(FLAGS.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, default=float)
  print(f"\nwrote {FLAGS.out}/summary.json and results.json")


if __name__ == "__main__":
  app.run(main)
