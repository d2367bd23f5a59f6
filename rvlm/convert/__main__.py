"""python -m rvlm.convert COMMAND [flags]

  import    --hf_dir=D [--vision_dir=V] --out=O     HF directory -> rvlm workdir O
  export    --workdir=W --out=D [--step=N]          rvlm workdir -> HF directory D
  inspect   --workdir=W [--step=N]                  param tree, shapes, dtypes, count
  check     --hf_dir=D [--tolerance=T]              rvlm vs transformers, per model part
  recursify --workdir=W --out=O [--num_steps=R]     a standard model -> a RecursiveVLM
                                                    whose steps all start as the model

A mistake in the input (missing file or shard, unexpected or missing keys, a shape
mismatch, an unsupported architecture, an existing output) prints one line naming it
and exits 2 with nothing written; `check` exits 1 when a part differs by more than the
tolerance.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging

from rvlm.utils import cli

COMMANDS = ("import", "export", "inspect", "check", "recursify")
PROG = "rvlm.convert"


def define_flags(fv):
  flags.DEFINE_string("hf_dir", None, "Hugging Face directory (config.json + safetensors)",
                      flag_values=fv)
  flags.DEFINE_string("vision_dir", None, "import: a SiglipVisionModel directory for a "
                      "Llama / Qwen2 --hf_dir", flag_values=fv)
  flags.DEFINE_string("out", None, "output directory (must not exist or be empty)",
                      flag_values=fv)
  flags.DEFINE_string("workdir", None, "an rvlm workdir (trained, or written by import)",
                      flag_values=fv)
  flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)", flag_values=fv)
  flags.DEFINE_float("tolerance", 1e-3, "check: the largest max-abs difference accepted "
                     "(float32; tiny models agree to ~1e-6, 7B ones to ~1e-4 to 1e-3)",
                     flag_values=fv)
  flags.DEFINE_integer("num_steps", 3, "recursify: recursion steps R", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "init seed of fresh params; check's random inputs",
                       flag_values=fv)


class _BadInput(Exception):
  pass


def _need(fv, *names):
  for name in names:
    if not fv[name].value:
      raise _BadInput(f"--{name} is required")


def _param_rows(params):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  return [(p, tuple(v.shape), str(v.dtype), int(np.prod(v.shape))) for p, v in sorted(flat.items())]


def run(command, fv):
  from rvlm import inference  # pylint: disable=g-import-not-at-top  (heavy imports)
  from rvlm.convert import check as check_lib  # pylint: disable=g-import-not-at-top
  from rvlm.convert import exporter, importer, recursify  # pylint: disable=g-import-not-at-top
  if command == "import":
    _need(fv, "hf_dir", "out")
    imported = importer.load_hf(fv.hf_dir, fv.vision_dir, fv.seed)
    out = importer.write_workdir(imported, fv.out)
    m = imported.model
    print(f"imported {imported.hf_dir} -> {out}")
    print(f"  {m.hf.layout}: {m.hf.text_family} decoder {m.decoder.depth} layers, width "
          f"{m.decoder.width}, vocab {m.vocab_size}; ViT {m.vit.depth} layers at "
          f"{m.vit.image_size}px; {sum(r[3] for r in _param_rows(imported.params)):,} params")
    for note in imported.notes:
      print(f"  {note}")
    print(f"  fine-tune it recursively: python -m rvlm.main "
          f"--config=configs/experiments/recursify.py --config.init_from={out} ...")
    return 0
  if command in ("export", "inspect", "recursify"):
    _need(fv, "workdir", *(("out",) if command != "inspect" else ()))
    loaded = inference.load(fv.workdir, fv.step)
    if command == "export":
      out = exporter.export(loaded.config, loaded.params, fv.out)
      print(f"exported {loaded.workdir} (step {loaded.step}) -> {out} "
            f"({exporter.layout_of(loaded.config.model)} layout)")
      return 0
    if command == "recursify":
      model, params = recursify.recursify(loaded.config.model, loaded.params, fv.num_steps,
                                          seed=fv.seed)
      tok = dict(loaded.config.data.tokenizer)
      hf_tok = tok.get("kind") == "hf"
      imported = importer.Imported(
          model=model, params=params, tokenizer=tok if hf_tok else {}, hf_dir=loaded.workdir,
          tokenizer_dir=os.path.dirname(tok["path"]) if hf_tok else None,
          notes=[f"recursified {loaded.workdir} (R={fv.num_steps})"])
      out = importer.write_workdir(imported, fv.out)
      print(f"recursified {loaded.workdir} -> {out}: mode connector, R={fv.num_steps}, "
            "connector at zero (every step equals the original model)")
      return 0
    rows = _param_rows(loaded.params)
    width = max(len(r[0]) for r in rows)
    m = loaded.config.model
    print(f"{loaded.workdir} step {loaded.step}: recursion {m.recursion.mode} "
          f"R={m.recursion.num_steps}, attention {m.get('attention', 'prefix')}")
    for path, shape, dtype, _ in rows:
      print(f"  {path:<{width}}  {str(shape):<22} {dtype}")
    print(f"  {len(rows)} arrays, {sum(r[3] for r in rows):,} parameters")
    return 0
  _need(fv, "hf_dir")
  results = check_lib.check(fv.hf_dir, seed=fv.seed)
  worst = 0.0
  for part, diff, what in results:
    flag = "ok" if diff <= fv.tolerance else "ABOVE TOLERANCE"
    print(f"  {part:<28} max |rvlm - transformers| = {diff:.3e}  ({what})  {flag}")
    worst = max(worst, diff)
  verdict = "within" if worst <= fv.tolerance else "above"
  print(f"largest difference {worst:.3e}: {verdict} tolerance {fv.tolerance:g}")
  return 0 if worst <= fv.tolerance else 1


def main(argv):
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print(f"{PROG}: error: the first argument must be one of {', '.join(COMMANDS)}\n"
          f"{__doc__}", file=sys.stderr)
    sys.exit(2)
  from rvlm.convert.safetensors_io import ConversionError  # pylint: disable=g-import-not-at-top
  from rvlm.inference import InferenceError  # pylint: disable=g-import-not-at-top
  command = argv[1]
  rc = cli.run_own_flags([argv[0]] + argv[2:], prog=f"{PROG} {command}",
                         define_flags=define_flags, run=lambda fv: run(command, fv),
                         errors=(_BadInput, ConversionError, InferenceError, ValueError,
                                 FileNotFoundError))
  sys.exit(rc)


def _flags_parser(argv):
  logging.set_verbosity(logging.WARNING)
  return cli.program_name_only(argv)


if __name__ == "__main__":
  app.run(main, flags_parser=_flags_parser)
