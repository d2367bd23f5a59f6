"""RecursiveVLM on the embedded multi-hop visual QA dataset (the CPU default).

  python -m rvlm.main --config=configs/base.py --workdir=/tmp/rvlm_base

Variants: `configs/base.py:preset=tiny` picks another model preset; any field can be
overridden, e.g. `--config.model.recursion.num_steps=4 --config.train.total_steps=200`.
"""
import ml_collections

from rvlm.models import presets


def parse_args(arg, defaults, where):
  """'key=value,...' (the text after ':' in --config=FILE:ARG) over `defaults`."""
  args = dict(defaults)
  for kv in (arg or "").split(","):
    if not kv:
      continue
    k, _, v = kv.partition("=")
    if k not in args:
      raise ValueError(f"{where}: unknown argument {k!r}; known: {sorted(args)}")
    args[k] = v
  return args


def get_config(arg=None):
  """Returns the default config; `arg` is 'key=value,...' (preset=...)."""
  args = parse_args(arg, dict(preset="small"), "configs/base.py")

  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---- model -------------------------------------------------------------------
  c.model = presets.get_preset(args["preset"])

  # ---- loss --------------------------------------------------------------------
  c.loss = ml_collections.ConfigDict(dict(
      # monotonic: every step, tokens whose loss rose vs step r-1 weighted by beta.
      # final_only: last step only (the vanilla baseline's default).
      kind="monotonic",
      beta=2.0,
      form="hard",         # hard (beta weights) | soft (l + gamma*SiLU(l - sg(l_prev)))
      gamma=1.0,
      step_weights=(),     # lambda_r; empty = all ones
  ))

  # ---- data --------------------------------------------------------------------
  # Image size and patch come from c.model.vit (the embedded grid is their ratio).
  c.data = ml_collections.ConfigDict(dict(
      name="embedded",     # embedded | embedded_tfds | llava
      batch_size=64,       # global batch
      seq_len=24,          # text tokens per example (bos + prompt + answer + eos)
      # Length-aware batches (rvlm/data/buckets.py): none | auto | "16,32,64": each batch
      # is cut to the smallest bucket length holding its longest example.
      buckets="none",
      max_seq_len=512,     # cap for seq_len=0 (auto: the longest train record)
      num_workers=0,       # grain worker processes (0: preprocess in this process)
      strict=False,        # False: skip + count bad input; True: raise (file, line)
      shuffle_seed=0,      # combined with c.seed; epochs reshuffle
      # Optional weighted training mixture, "name:weight,..." (e.g.
      # "embedded:0.7,llava:0.3"); empty = `name` alone. Eval reads `name`.
      mixture="",
      embedded=dict(
          num_train=1_000_000,   # examples are rendered on the fly from (seed, i)
          num_val=10_000,
          num_test=10_000,       # also the size of test_comp
          # The 10-minute CPU default trains on single-hop lookups only: in calibration
          # runs (docs in README) the multi-family mix did not rise above its
          # answer priors within ~700 steps. configs/multihop.py has the full mix.
          families="lookup",
          family_weights="",     # "w1,w2,..." per family; empty = uniform
          num_colours=8,
          num_shapes=3,          # square, circle, triangle (4 adds diamond)
          min_objects=4,
          max_objects=7,
          max_hops=3,            # pointer/chase families: train h drawn from 1..max_hops
          eval_max_hops=0,       # val/test draw h from 1..eval_max_hops (0: max_hops)
          hop_focus=0.0,         # share of train examples drawn at max_hops exactly
          chase_chains=3,        # chase: chains per scene (distractors of equal length)
          chase_colours=26,      # chase: palette size (rvlm/data/chase.py)
          chase_decoys=0,        # chase: lone plain squares on no chain (shortcut guard)
          max_count=3,
          # (colour, shape) pairs absent from train/val/test; test_comp names them.
          heldout_pairs="red circle,green triangle,blue square,yellow circle",
      ),
      # kind: embedded (word vocab, 123 ids) | bytes (UTF-8, 260 ids) | sentencepiece |
      # hf (tokenizer.json) | auto (a sentencepiece model of up to auto_vocab_size
      # pieces trained on the train text into the workdir: rvlm/data/resolve.py).
      # bos/eos/pad: token names for hf tokenizers; empty = common spellings.
      # Hop-count curriculum (rvlm/data/curriculum.py): train max_hops starts at `start`
      # and rises by one when val accuracy at exactly that many hops (final depth)
      # reaches `threshold`, checked every `every` steps, up to embedded.max_hops.
      curriculum=dict(enabled=False, start=2, threshold=0.9, every=100, num_examples=128),
      tokenizer=dict(kind="embedded", path="", bos="", eos="", pad="", auto_vocab_size=1024),
      tfds_dir="",         # embedded_tfds: built by python -m rvlm.data.tfds_embedded
      train_json="",       # llava: JSON/JSONL records
      eval_json="",
      image_dir="",        # llava: record image paths are relative to this
  ))

  # ---- optimizer ---------------------------------------------------------------
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw",
      # Measured on the default: 3e-3 stalled the R = 3 model near the majority answer
      # (gradient norm growing 1 -> 5) while R = 1 trained fine; 1e-3 reached 0.95.
      lr=1e-3,
      warmup_steps=50,
      schedule="cosine",   # cosine | constant
      end_lr_factor=0.05,
      b1=0.9,
      b2=0.95,
      weight_decay=0.05,
      # Params matching these regexes get no weight decay (norms, biases, connector
      # scale and projections: decaying them would pull recursion back to off).
      no_decay=(r".*scale$", r".*bias$", r".*alpha$", r".*connector.*", r".*pos_embedding$"),
      freeze=(),           # regexes of params kept fixed
      grad_clip=1.0,
  ))

  # ---- training loop -----------------------------------------------------------
  c.train = ml_collections.ConfigDict(dict(
      total_steps=700,
      grad_accum_steps=1,
      log_every=50,
      eval_every=350,
      checkpoint_every=350,
      keep_checkpoints=2,
      nan_policy="stop",   # stop | skip
  ))

  # ---- evaluation --------------------------------------------------------------
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=256,
      num_examples=512,    # per eval split
      # test_comp: colour-shape pairs never seen in training (compositional split).
      splits=("val", "test", "test_comp"),
      # Evaluate depths 1..max_depth (0: the trained R; above R: depth extrapolation).
      max_depth=0,
      # The final evaluation also decodes the test split's answers (greedy,
      # rvlm/decode.py) at each depth: results.json's generated_exact_match_by_depth
      # and generated_f1_by_depth beside the teacher-forced accuracy_by_depth.
      generated=True,
  ))

  # ---- sharding ----------------------------------------------------------------
  # data x fsdp x tensor devices (one may be -1: the rest). Multi-slice TPU: dcn_data =
  # number of slices; the three sizes then describe one slice and 'data' also spans
  # the slices (rvlm/sharding.make_mesh). `python -m rvlm.compile_check` sizes a mesh.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1))

  c.init_from = ""         # params-only initialisation from another workdir's checkpoint
  # Regexes of param paths that may be absent from the init_from checkpoint and keep
  # their fresh init, e.g. (".*connector.*",) to make a trained standard model recursive.
  c.init_from_allow_new = ()
  return c
