"""Writes a PNG grid of dataset images with their questions and answers.

  python -m rvlm.data.show --config=configs/base.py --split=train --num=16 --out=/tmp/show

For checking what a model is fed: the images are the preprocessed ones (resized to
config.model.vit.image_size) and the text is decoded from the batch tokens.
"""
import math
import os

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
from PIL import Image, ImageDraw, ImageFont

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to show.")
_NUM = flags.DEFINE_integer("num", 16, "Number of examples.")
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_SCALE = flags.DEFINE_integer("cell", 192, "Pixels per shown image.")


def _wrap(text, width):
  words, lines, line = text.split(), [], ""
  for w in words:
    if line and len(line) + 1 + len(w) > width:
      lines.append(line)
      line = w
    else:
      line = f"{line} {w}".strip()
  return lines + ([line] if line else [])


def render_grid(batch, tokenizer, family_names, cell=192):
  """PIL image: one tile per example (image, family/hops, prompt, answer)."""
  n = len(batch["tokens"])
  cols = min(4, n)
  rows = math.ceil(n / cols)
  text_h = 12 * 8 + 6
  grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  font = ImageFont.load_default()
  for k in range(n):
    x, y = (k % cols) * cell, (k // cols) * (cell + text_h)
    img = ((batch["image"][k] + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    grid.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (x, y))
    toks, ar, loss = (batch[f][k] for f in ("tokens", "mask_ar", "mask_loss"))
    real = batch["input_mask"][k].astype(bool)
    prompt = tokenizer.decode(toks[real & (ar == 0)].tolist())
    answer = tokenizer.decode(toks[real & (loss == 1)].tolist())
    head = f"{family_names[int(batch['family'][k])]} h={int(batch['hops'][k])}"
    lines = [head] + _wrap(prompt, cell // 6)[:6] + [f"-> {answer}"]
    for j, line in enumerate(lines):
      draw.text((x + 3, y + cell + 2 + 12 * j), line, fill=(0, 0, 0), font=font)
  return grid


def main(argv):
  del argv
  from rvlm import data  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  if _SPLIT.value == "train":
    it = data.build_train_iterator(config)
    batches = [next(it) for _ in range(-(-_NUM.value // config.data.batch_size))]
    it.close()
  else:
    batches = data.build_eval_batches(config, _SPLIT.value, config.data.batch_size,
                                      _NUM.value)
  batch = {k: np.concatenate([b[k] for b in batches])[:_NUM.value] for k in batches[0]}
  if "example_mask" in batch:
    batch = {k: v[batch["example_mask"] == 1] for k, v in batch.items()}
  grid = render_grid(batch, data.get_tokenizer(config.data), data.family_names(config),
                     _SCALE.value)
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, f"{_SPLIT.value}.png")
  grid.save(path)
  print(f"wrote {path} ({len(batch['tokens'])} examples); skips: {data.skip_counts()}")


if __name__ == "__main__":
  app.run(main)
