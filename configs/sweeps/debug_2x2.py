"""A 2 x 2 smoke sweep on the debug config: recursion depth R x seed, 10 steps.

  python -m rvlm.sweep --sweep=configs/sweeps/debug_2x2.py --out=/tmp/rvlm_sweep_debug

Four runs of seconds each once compiled (tests/test_sweep.py runs it end to end): the
accuracies are those of a barely trained model; the sweep's plumbing is what it
exercises. Seeds, not learning rates, are the second axis: the learning rate is a
constant of the compiled train step, so every value costs a compilation, while the
seed only changes data, and the two depths need two programs either way.
"""


def get_sweep():
  return dict(
      config="configs/debug.py",
      base={
          # The settings of the tests' trained_workdir fixture (tests/conftest.py): the
          # R = 2 programs are then already in the test session's compilation cache.
          "train.total_steps": 10,
          "train.log_every": 5,
          "train.eval_every": 10,
          "train.checkpoint_every": 10,
          "eval.num_examples": 32,
          # One eval split and no decoding: the table reads the primary split's
          # teacher-forced accuracy, and each extra split or decode costs time.
          "eval.splits": ("test",),
          "eval.generated": False,
      },
      grid={
          "model.recursion.num_steps": [1, 2],
          "seed": [0, 1],
      },
  )
