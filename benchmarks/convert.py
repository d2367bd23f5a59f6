"""Hugging Face conversion of a realistic-size checkpoint: time and peak memory of
`python -m rvlm.convert import`, `export` and `check`.

  python benchmarks/convert.py [--dtype=bfloat16] [--layers=4 --vocab=32000] [--json=PATH]

Builds (offline, transformers' random init) a Qwen2ForCausalLM shaped like Qwen2-0.5B
by default (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, vocab 151936, tied
embeddings), saved sharded (--max_shard_size) as the Hub lays it out; --hf_dir reuses
(or keeps) that directory. Building runs in its own process and is timed apart from the
steps. Each step then runs as its own subprocess, so its peak RSS (os.wait4's
ru_maxrss of that child alone) is the converter's own, not this script's:
  import  HF directory -> rvlm workdir (orbax checkpoint; the ViT and projector, which a
          causal LM has no weights for, are freshly initialised: rvlm's `small` preset)
  export  that workdir -> HF directory (+ vision_tower/, rvlm_extra.safetensors)
  check   rvlm vs transformers on random tokens (both models in one process)
The table's ratio is peak RSS / the float32 bytes of the checkpoint's params; `anon` and
`file` split the peak (sampled every 50 ms) into anonymous memory and pages of
memory-mapped files (safetensors shards; transformers 5 keeps its weights mmapped).
The HF tensors are read one at a time; import's peak is usually the orbax save of the
workdir (it copies every array and holds their compressed chunks), not the reading.
"""
import json
import os
import re
import shutil
import sys
import tempfile

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.common import GIB, machine, run_child  # noqa: E402  pylint: disable=g-import-not-at-top

flags.DEFINE_integer("layers", 24, "num_hidden_layers")
flags.DEFINE_integer("hidden", 896, "hidden_size")
flags.DEFINE_integer("heads", 14, "num_attention_heads (head_dim = hidden / heads)")
flags.DEFINE_integer("kv_heads", 2, "num_key_value_heads")
flags.DEFINE_integer("intermediate", 4864, "intermediate_size (MLP)")
flags.DEFINE_integer("vocab", 151936, "vocab_size")
flags.DEFINE_bool("tied", True, "tie_word_embeddings (no lm_head.weight)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype the checkpoint is "
                  "saved in (rvlm always imports float32)")
flags.DEFINE_string("max_shard_size", "500MB", "save_pretrained(max_shard_size=...)")
flags.DEFINE_string("hf_dir", None, "Reuse this HF directory if it has a config.json, else "
                    "build the model there and keep it (default: a temp dir, deleted)")
flags.DEFINE_string("dir", None, "Where the workdir and export go (default: a temp dir)")
flags.DEFINE_list("steps", ["import", "export", "check"], "Steps to time, in order "
                  "(export needs import)")
flags.DEFINE_float("tolerance", 1e-3, "check --tolerance")
flags.DEFINE_string("json", None, "Also write the figures here as JSON")
flags.DEFINE_bool("build_only", False, "Internal: build the model into --hf_dir and exit")
FLAGS = flags.FLAGS


def build(hf_dir):
  """Writes a random-weight Qwen2ForCausalLM of the flags' shape to `hf_dir`."""
  import torch  # pylint: disable=g-import-not-at-top  (only the build process needs it)
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = transformers.Qwen2Config(
      vocab_size=FLAGS.vocab, hidden_size=FLAGS.hidden, intermediate_size=FLAGS.intermediate,
      num_hidden_layers=FLAGS.layers, num_attention_heads=FLAGS.heads,
      num_key_value_heads=FLAGS.kv_heads, tie_word_embeddings=FLAGS.tied,
      max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=151643,
      eos_token_id=151643, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
  model = transformers.Qwen2ForCausalLM(config).eval()
  # Norm scales start at 1 and biases at 0: perturbed (cheap, 1-D only) so that `check`
  # would see a mix-up of them.
  with torch.no_grad():
    for p in model.parameters():
      if p.dim() == 1:
        p.add_(0.1 * torch.randn(p.shape))
  if FLAGS.dtype == "bfloat16":
    model = model.to(torch.bfloat16)
  model.save_pretrained(hf_dir, max_shard_size=FLAGS.max_shard_size)


def checkpoint_facts(hf_dir):
  """(safetensors bytes on disk, files, parameter count) of an HF directory."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  size, files, count = 0, 0, 0
  for name in sorted(os.listdir(hf_dir)):
    if not name.endswith(".safetensors"):
      continue
    path = os.path.join(hf_dir, name)
    size += os.path.getsize(path)
    files += 1
    with safe_open(path, framework="numpy") as f:
      for key in f.keys():
        n = 1
        for d in f.get_slice(key).get_shape():
          n *= d
        count += n
  return size, files, count


def du(path):
  return sum(os.path.getsize(os.path.join(root, n))
             for root, _, names in os.walk(path) for n in names)


def convert(*args):
  return [sys.executable, "-m", "rvlm.convert", *args]


BASELINE = ("import rvlm.convert.importer, rvlm.convert.exporter, rvlm.inference; "
            "import jax; jax.numpy.zeros(1).block_until_ready()")


def _row(res, f32_bytes):
  return dict(seconds=res["seconds"], peak_rss_bytes=res["peak_rss_bytes"],
              peak_anon_bytes=res["peak_anon_bytes"], peak_file_bytes=res["peak_file_bytes"],
              rc=res["rc"], ratio_to_f32_params=res["peak_rss_bytes"] / f32_bytes)


def main(argv):
  del argv
  if FLAGS.build_only:
    build(FLAGS.hf_dir)
    return
  for step in FLAGS.steps:
    if step not in ("import", "export", "check"):
      raise app.UsageError(f"--steps: unknown step {step!r}")
  if "export" in FLAGS.steps and "import" not in FLAGS.steps:
    raise app.UsageError("--steps: export needs import")
  keep = bool(FLAGS.dir)
  root = os.path.abspath(FLAGS.dir) if keep else tempfile.mkdtemp(prefix="rvlm_convert_")
  os.makedirs(root, exist_ok=True)
  hf_dir = os.path.abspath(FLAGS.hf_dir) if FLAGS.hf_dir else os.path.join(root, "hf")
  shape = (f"Qwen2ForCausalLM layers={FLAGS.layers} hidden={FLAGS.hidden} heads={FLAGS.heads}"
           f"/{FLAGS.kv_heads} mlp={FLAGS.intermediate} vocab={FLAGS.vocab} "
           f"tied={FLAGS.tied} {FLAGS.dtype}")
  m = machine()
  print(f"machine: {m['cpu']}, {m['cores']} cores | python {m['python']}, jax {m['jax']}, "
        f"transformers {m['transformers']}, torch {m['torch']}, safetensors "
        f"{m['safetensors']}, orbax {m['orbax']} | {m['date']}")
  figures = dict(machine=m, build=None, steps={})
  try:
    if os.path.exists(os.path.join(hf_dir, "config.json")):
      with open(os.path.join(hf_dir, "config.json")) as f:
        c = json.load(f)
      shape = (f"{(c.get('architectures') or ['?'])[0]} layers={c.get('num_hidden_layers')} "
               f"hidden={c.get('hidden_size')} heads={c.get('num_attention_heads')}/"
               f"{c.get('num_key_value_heads')} mlp={c.get('intermediate_size')} "
               f"vocab={c.get('vocab_size')} tied={c.get('tie_word_embeddings')} "
               f"{c.get('dtype') or c.get('torch_dtype')}")
      print(f"reusing {hf_dir}: {shape} (the shape flags are ignored)")
    else:
      print(f"building {shape}, shards of {FLAGS.max_shard_size} -> {hf_dir}")
      flag_args = [f"--{n}={FLAGS[n].value}" for n in ("layers", "hidden", "heads", "kv_heads",
                                                       "intermediate", "vocab", "dtype",
                                                       "max_shard_size")]
      flag_args.append("--tied" if FLAGS.tied else "--notied")
      res = run_child([sys.executable, os.path.abspath(__file__), "--build_only",
                       f"--hf_dir={hf_dir}", *flag_args], root, "build")
      if res["rc"]:
        sys.exit(f"building failed (exit {res['rc']}):\n{res['stderr'][-4000:]}")
      figures["build"] = dict(seconds=res["seconds"], peak_rss_bytes=res["peak_rss_bytes"])
      print(f"  built in {res['seconds']:.1f} s, peak RSS {res['peak_rss_bytes'] / GIB:.2f} GiB "
            "(not counted below)")
    size, n_files, n_params = checkpoint_facts(hf_dir)
    f32_bytes = 4 * n_params
    figures["checkpoint"] = dict(hf_dir=hf_dir, shape=shape, max_shard_size=FLAGS.max_shard_size,
                                 safetensors_bytes=size, safetensors_files=n_files,
                                 params=n_params, float32_bytes=f32_bytes)
    print(f"checkpoint: {n_params:,} params in {n_files} safetensors files, "
          f"{size / GIB:.3f} GiB on disk; as float32 {f32_bytes / GIB:.3f} GiB")

    res = run_child([sys.executable, "-c", BASELINE], root, "baseline")
    figures["baseline"] = _row(res, f32_bytes)
    print(f"baseline (python + jax + rvlm.convert imports, no params): "
          f"{res['seconds']:.1f} s, peak RSS {res['peak_rss_bytes'] / GIB:.2f} GiB")

    workdir, export_dir = os.path.join(root, "workdir"), os.path.join(root, "export")
    for d in (workdir, export_dir):
      shutil.rmtree(d, ignore_errors=True)
    for step in FLAGS.steps:
      args = {"import": convert("import", f"--hf_dir={hf_dir}", f"--out={workdir}"),
              "export": convert("export", f"--workdir={workdir}", f"--out={export_dir}"),
              "check": convert("check", f"--hf_dir={hf_dir}",
                               f"--tolerance={FLAGS.tolerance}")}[step]
      print(f"{step}: python {' '.join(args[1:])}")
      res = run_child(args, root, step)
      row = _row(res, f32_bytes)
      lines = [l for l in res["stdout"].splitlines() if l.strip() and "fine-tune it" not in l]
      if step == "import" and res["rc"] == 0:
        found = re.search(r"([\d,]+) params", res["stdout"])
        if found:
          row["workdir_params"] = int(found.group(1).replace(",", ""))
        row["workdir_bytes"] = du(workdir)
      if step == "export" and res["rc"] == 0:
        row["export_bytes"] = du(export_dir)
      if step == "check":
        row["max_diffs"] = {d.group(1).strip(): float(d.group(2)) for d in
                            re.finditer(r"^\s+(.+?)\s+max \|rvlm - transformers\| = (\S+)",
                                        res["stdout"], re.M)}
      for line in lines:
        print(f"  | {line}")
      if res["rc"] and not (step == "check" and res["rc"] == 1):
        print(f"  FAILED (exit {res['rc']}):\n{res['stderr'][-4000:]}")
      figures["steps"][step] = row
      print(f"  {res['seconds']:.1f} s, peak RSS {res['peak_rss_bytes'] / GIB:.2f} GiB "
            f"(sampled: anonymous {res['peak_anon_bytes'] / GIB:.2f}, file-backed "
            f"{res['peak_file_bytes'] / GIB:.2f})")
      if res["rc"] and step == "import":
        break
  finally:
    if not keep:
      shutil.rmtree(root, ignore_errors=True)

  steps = figures["steps"]
  imp = steps.get("import", {})
  if imp.get("workdir_params"):
    n = imp["workdir_params"]
    print(f"\nimported workdir: {n:,} params ({n_params:,} from the checkpoint, "
          f"{n - n_params:,} freshly initialised ViT + projector); orbax checkpoint "
          f"{imp['workdir_bytes'] / GIB:.3f} GiB on disk")
  if "export_bytes" in steps.get("export", {}):
    print(f"export: {steps['export']['export_bytes'] / GIB:.3f} GiB on disk")
  print(f"\n{shape}, {n_params / 1e6:.1f}M params, {n_files} shards of {FLAGS.max_shard_size}"
        f" ({size / GIB:.3f} GiB)\nratio = peak RSS / float32 bytes of the checkpoint's params "
        f"({f32_bytes / GIB:.3f} GiB); anon / file: sampled peaks of anonymous and "
        "file-backed (mmap) RSS")
  print(f"{'step':<10} {'seconds':>8} {'peak RSS GiB':>13} {'anon':>6} {'file':>6} "
        f"{'ratio':>6} {'exit':>5}")
  if figures["build"]:
    b = figures["build"]
    print(f"{'(build)':<10} {b['seconds']:>8.1f} {b['peak_rss_bytes'] / GIB:>13.2f}")
  for step, row in [("(baseline)", figures["baseline"])] + list(steps.items()):
    print(f"{step:<10} {row['seconds']:>8.1f} {row['peak_rss_bytes'] / GIB:>13.2f} "
          f"{row['peak_anon_bytes'] / GIB:>6.2f} {row['peak_file_bytes'] / GIB:>6.2f} "
          f"{row['ratio_to_f32_params']:>6.2f} {row['rc']:>5}")
  for part, diff in steps.get("check", {}).get("max_diffs", {}).items():
    print(f"check: {part} max |rvlm - transformers| = {diff:.3e} (tolerance {FLAGS.tolerance:g})")
  print(f"machine: {m['cpu']}, {m['cores']} cores, jax {m['jax']}, transformers "
        f"{m['transformers']}, {m['date']}")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(figures, f, indent=2)
    print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
  app.run(main)
