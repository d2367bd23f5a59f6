"""The recursion sweep on the CPU default: a standard transformer, the vanilla recursive
baseline and RecursiveVLM at R = 2, 3, 4, two seeds each (10 runs of configs/base.py).

  python -m rvlm.sweep --sweep=configs/sweeps/recursion.py --out=/tmp/rvlm_sweep_recursion

On a TPU VM (launch/tpu/tpu.sh; OUT on GCS, the table gathered after copying it back):

  python -m rvlm.sweep --sweep=configs/sweeps/recursion.py --out=gs://BUCKET/recursion \\
      --launcher=tpu --launcher_args="--name=my-tpu --zone=us-central2-b"

Each method sets the same fields as configs/experiments/common.py's modes (the vanilla
baseline trains on its final step only); runs are named 'standard_seed0', 'rvlm_R3_seed1'.
"""

METHODS = [
    {"model.recursion.mode": "none", "model.recursion.num_steps": 1},
    {"model.recursion.mode": "vanilla", "model.recursion.num_steps": 3,
     "loss.kind": "final_only"},
    {"model.recursion.mode": "connector", "model.recursion.num_steps": 2},
    {"model.recursion.mode": "connector", "model.recursion.num_steps": 3},
    {"model.recursion.mode": "connector", "model.recursion.num_steps": 4},
]
LABELS = {"none": "standard", "vanilla": "vanilla", "connector": "rvlm"}


def name(overrides):
  mode = overrides["model.recursion.mode"]
  depth = "" if mode == "none" else f"_R{overrides['model.recursion.num_steps']}"
  return f"{LABELS[mode]}{depth}_seed{overrides['seed']}"


def get_sweep():
  return dict(config="configs/base.py", runs=METHODS, grid={"seed": [0, 1]}, name=name)
