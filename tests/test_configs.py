"""Every config builds, validates, and the experiment configs differ only in the method."""
import importlib

import pytest
from flax import traverse_util

from rvlm import losses
from rvlm.models import vlm

CONFIGS = ["configs.base", "configs.debug", "configs.multihop", "configs.llava_format", "configs.chase",
           "configs.chase_small", "configs.experiments.standard",
           "configs.experiments.vanilla", "configs.experiments.rvlm", "configs.experiments.paper"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_and_validates(name):
  c = importlib.import_module(name).get_config()
  vlm.check_model_config(c.model)
  losses.check_loss_config(c.loss, c.model.recursion.num_steps)
  assert c.data.batch_size > 0 and c.train.total_steps > 0


def _flat(d):
  return traverse_util.flatten_dict(d, sep=".")


def test_experiments_share_everything_but_the_recursion_method():
  flat = {m: _flat(importlib.import_module(f"configs.experiments.{m}").get_config().to_dict())
          for m in ("standard", "vanilla", "rvlm")}
  method_fields = {"model.recursion.mode", "model.recursion.num_steps", "loss.kind"}
  for m in ("standard", "vanilla"):
    differ = {k for k in flat["rvlm"] if flat["rvlm"][k] != flat[m][k]}
    assert differ and differ <= method_fields, (m, differ)
  assert flat["rvlm"]["model.recursion.mode"] == "connector"
  assert flat["vanilla"]["loss.kind"] == "final_only"
  assert flat["standard"]["model.recursion.num_steps"] == 1


def test_base_config_arguments():
  from configs import base  # pylint: disable=g-import-not-at-top
  assert base.get_config("preset=tiny").model.decoder.width == 32
  with pytest.raises(ValueError, match="unknown argument"):
    base.get_config("size=huge")
