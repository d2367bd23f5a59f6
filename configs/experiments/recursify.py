"""Fine-tune a pretrained (imported) model as a RecursiveVLM on LLaVA-format data.

  python -m rvlm.convert import --hf_dir=/models/llava-siglip-qwen2 --out=/tmp/imported
  python -m rvlm.main --config=configs/experiments/recursify.py --workdir=/tmp/recursive \\
      --config.init_from=/tmp/imported \\
      --config.data.train_json=/data/train.jsonl --config.data.eval_json=/data/val.jsonl \\
      --config.data.image_dir=/data/images

The model's architecture, vocabulary, image size and tokenizer come from the imported
workdir (config.model_from_init, rvlm/convert/recursify.py); this config decides the
recursion (RecursiveVLM, R = 2) and the connector. The connector is new
(init_from_allow_new) with its projections at zero, so at step 0 every recursion step
reproduces the pretrained model; the Monotonic Recursion Loss then trains the steps to
improve on each other. Fine-tuning a pretrained model wants a small learning rate.
Real models need accelerators and, for billion-parameter decoders, a mesh
(--config.mesh.fsdp=N).
"""
from configs import llava_format
from configs.experiments import common


def get_config(arg=None):
  c = llava_format.get_config(arg)
  common.apply_mode(c, "rvlm")
  c.model_from_init = True
  c.init_from = ""                 # the workdir `python -m rvlm.convert import` wrote
  c.init_from_allow_new = (r"recursion/step/connector/.*",)
  c.model.recursion.num_steps = 2
  c.model.connector.init = "zeros"  # every step starts as the pretrained model
  c.model.connector.base = "embed"
  # Imported models are real-sized: the outer scan keeps compile time flat in R and full
  # remat keeps activation memory lowest, not the CPU presets' faster loop + dots.
  c.model.recursion.impl = "scan"
  c.model.remat_policy = "full"
  c.data.tokenizer.kind = "hf"      # replaced by the imported model's tokenizer
  c.optim.lr = 2e-5
  c.optim.warmup_steps = 20
  c.train.total_steps = 200
  return c
