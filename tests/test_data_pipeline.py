"""grain pipeline: batch contract, workers, resume, process split, eval, mixtures."""
import json

import numpy as np
import pytest

from configs import multihop  # the full family mix
from rvlm import data
from rvlm.data import families


def _config(**data_overrides):
  c = multihop.get_config()
  c.data.batch_size = 16
  for k, v in data_overrides.items():
    c.data[k] = v
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_train_batches_follow_the_contract():
  c = _config()
  it = data.build_train_iterator(c)
  b = next(it)
  it.close()
  T = c.data.seq_len
  assert set(b) == {"image", "image_mask", "tokens", "input_mask", "mask_ar",
                    "mask_loss", "family", "hops"}
  assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.float32
  assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
  for k in ("tokens", "input_mask", "mask_ar", "mask_loss"):
    assert b[k].shape == (16, T) and b[k].dtype == np.int32
  for k in ("image_mask", "family", "hops"):
    assert b[k].shape == (16,) and b[k].dtype == np.int32
  assert (b["image_mask"] == 1).all()
  tok = data.get_tokenizer(c.data)
  assert tok.vocab_size <= c.model.vocab_size == 256 and tok.pad_id == 0
  for r in range(16):
    n = int(b["input_mask"][r].sum())
    toks = b["tokens"][r]
    assert b["input_mask"][r, :n].all() and not toks[n:].any()
    assert toks[0] == tok.bos_id and toks[n - 1] == tok.eos_id
    # One-word answers: prefix = bos + prompt, then answer + eos are supervised.
    assert b["mask_ar"][r, :n].tolist() == [0] * (n - 2) + [1, 1]
    assert b["mask_loss"][r].tolist() == [0] * (n - 2) + [1, 1] + [0] * (T - n)
    name = data.family_names(c)[b["family"][r]]
    assert name in families.FAMILIES and b["hops"][r] >= 1


def test_zero_and_two_workers_give_the_same_batches():
  a = data.build_train_iterator(_config(num_workers=0))
  w = data.build_train_iterator(_config(num_workers=2))
  try:
    for x, y in zip(_take(a, 3), _take(w, 3)):
      assert _equal(x, y)
  finally:
    a.close()
    w.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_restoring_state_resumes_at_the_exact_next_batch(workers):
  c = _config(num_workers=workers)
  it = data.build_train_iterator(c)
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))   # JSON-serialisable
  want = _take(it, 2)
  it.close()
  fresh = data.build_train_iterator(c)
  fresh.set_state(state)
  got = _take(fresh, 2)
  fresh.close()
  assert all(_equal(x, y) for x, y in zip(want, got))
  assert not _equal(want[0], want[1])


def test_epochs_repeat_forever_and_reshuffle():
  c = _config()
  c.data.embedded.num_train = 16
  it = data.build_train_iterator(c)
  e0, e1, e2 = _take(it, 3)
  it.close()
  key = lambda b: sorted(map(bytes, b["tokens"]))  # noqa: E731
  assert key(e0) == key(e1) == key(e2)             # same 16 examples each epoch
  assert not np.array_equal(e0["tokens"], e1["tokens"])  # in a new order


def test_processes_split_the_global_batch():
  c = _config()
  parts = [data.build_train_iterator(c, p, 2) for p in range(2)]
  batches = [next(p) for p in parts]
  whole = data.build_train_iterator(c)
  full = next(whole)
  for p in parts + [whole]:
    p.close()
  assert all(b["tokens"].shape == (8, c.data.seq_len) for b in batches)
  rows = lambda b: {bytes(b["image"][r]) + bytes(b["tokens"][r]) for r in range(len(b["tokens"]))}  # noqa: E731,E501
  assert not rows(batches[0]) & rows(batches[1])
  assert rows(batches[0]) | rows(batches[1]) == rows(full)
  with pytest.raises(ValueError, match="batch_size=16 is not divisible by process_count=3"):
    data.build_train_iterator(c, 0, 3)


def test_eval_batches_are_deterministic_and_padded():
  c = _config()
  a = data.build_eval_batches(c, "val", batch_size=32, num_examples=70)
  b = data.build_eval_batches(c, "val", batch_size=32, num_examples=70)
  assert len(a) == 3 and all(_equal(x, y) for x, y in zip(a, b))
  assert [int(x["example_mask"].sum()) for x in a] == [32, 32, 6]
  assert not a[-1]["input_mask"][6:].any() and not a[-1]["image_mask"][6:].any()
  # Per-process slices of each global batch.
  p1 = data.build_eval_batches(c, "val", batch_size=32, num_examples=70,
                               process_index=1, process_count=2)
  assert _equal(p1[0], {k: v[16:] for k, v in a[0].items()})
  comp = data.build_eval_batches(c, "test_comp", batch_size=32, num_examples=32)[0]
  assert "pointer" not in {data.family_names(c)[f] for f in comp["family"]}
  test = data.build_eval_batches(c, "test", batch_size=32, num_examples=32)[0]
  assert not np.array_equal(test["tokens"], a[0]["tokens"])


def test_mixture_draws_sources_by_weight(tmp_path):
  path = tmp_path / "mix.jsonl"
  path.write_text("\n".join(json.dumps({"question": f"q {k}", "answer": "yes"})
                            for k in range(10)))
  c = _config(mixture="embedded:3,llava:1", train_json=str(path), batch_size=64)
  it = data.build_train_iterator(c)
  fam = np.concatenate([b["family"] for b in _take(it, 4)])
  it.close()
  is_llava = fam == data.family_names(c).index("llava")
  assert 0.15 < is_llava.mean() < 0.35
  assert len(set(fam[~is_llava].tolist())) > 4
  with pytest.raises(ValueError, match="config.data.mixture"):
    data.build_train_iterator(_config(mixture="embedded:1,imagenet:1"))


def test_family_weights_select_families():
  c = _config()
  c.data.embedded.families = "chain3,pointer"
  c.data.embedded.family_weights = "1,0"
  it = data.build_train_iterator(c)
  b = next(it)
  it.close()
  assert set(b["family"].tolist()) == {data.family_names(c).index("chain3")}
  assert set(b["hops"].tolist()) == {3}
