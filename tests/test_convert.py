"""rvlm.convert against transformers on tiny random models built here (the `oracle`
extra): parity per model part, recursify, import -> export -> import, bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch", reason="the oracle extra (torch, transformers) is not installed: "
                    "pip install -e '.[oracle]'")
pytest.importorskip("transformers", reason="the oracle extra (transformers) is not installed")

import hf_models  # noqa: E402  (tests/, on sys.path under pytest)
from flax import traverse_util  # noqa: E402

from rvlm.convert import check as check_lib  # noqa: E402
from rvlm.convert import exporter, importer, recursify  # noqa: E402
from rvlm.convert.safetensors_io import ConversionError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4  # float32 logits; measured differences are ~3e-7 (decoders), ~2e-6 (SigLIP)

# name -> builder(dir): together they cover grouped-query (4 heads / 2 KV) and
# multi-query (1 KV head) attention, tied and untied embeddings, Qwen2's q/k/v biases,
# Llama's attention_bias / mlp_bias, and LLaVA reading the last or an inner vision layer.
MODELS = {
    "llama_gqa_untied": lambda d: hf_models.causal_lm(d, "llama", kv_heads=2, tied=False),
    "llama_mqa_tied_bias": lambda d: hf_models.causal_lm(d, "llama", kv_heads=1, tied=True,
                                                         bias=True),
    "qwen2_mqa_tied": lambda d: hf_models.causal_lm(d, "qwen2", kv_heads=1, tied=True),
    "qwen2_gqa_untied": lambda d: hf_models.causal_lm(d, "qwen2", kv_heads=2, tied=False),
    "siglip": hf_models.siglip,
    "llava_qwen2_layer-2": lambda d: hf_models.llava(d, "qwen2", feature_layer=-2),
    "llava_llama_tied_layer-1": lambda d: hf_models.llava(d, "llama", feature_layer=-1,
                                                          kv_heads=1, tied=True),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  return {name: build(str(root / name)) for name, build in MODELS.items()}


def _flat(params):
  return {p: np.asarray(v) for p, v in traverse_util.flatten_dict(dict(params), sep="/").items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_match_transformers(hf_dirs, name):
  results = check_lib.check(hf_dirs[name])
  parts = {part for part, _, _ in results}
  expected = ({"vision tower"} if name == "siglip" else
              {"vision tower", "projector", "decoder", "full model"} if name.startswith("llava")
              else {"decoder"})
  assert parts == expected
  for part, diff, what in results:
    assert diff < TOL, f"{name} {part} ({what}): max abs difference {diff:.2e}"


def test_import_reads_the_hf_config_into_config_model(hf_dirs):
  imp = importer.load_hf(hf_dirs["llava_qwen2_layer-2"])
  m = imp.model
  assert (m.decoder.depth, m.decoder.num_heads, m.decoder.num_kv_heads, m.decoder.head_dim,
          m.decoder.mlp_dim, m.decoder.rope_theta, m.decoder.norm_eps) == (2, 4, 2, 8, 48,
                                                                           20000.0, 1e-5)
  assert (m.decoder.qkv_bias, m.decoder.out_bias, m.tie_embeddings) == (True, False, False)
  # vision_feature_layer=-2 of a 3-layer tower: rvlm runs 2 layers, no post-norm.
  assert (m.vit.depth, m.vit.final_norm, m.vit.norm_eps, m.vit.patch_size) == (2, False, 1e-5, 4)
  assert (m.projector.act, m.attention, m.recursion.mode) == ("gelu", "causal", "none")
  assert imp.tokenizer == {"kind": "hf", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
  assert any("vision_tower.encoder.layers.2.* (16)" in n and "vision_tower.head.* (11)" in n
             and "vision_tower.post_layernorm.* (2)" in n for n in imp.notes), imp.notes


def _rvlm_logits_by_step(model_cfg, params, tokens, images):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rvlm.models import vlm  # pylint: disable=g-import-not-at-top
  b, t = tokens.shape
  batch = dict(tokens=jnp.asarray(tokens), input_mask=jnp.ones((b, t), jnp.int32),
               mask_ar=jnp.ones((b, t), jnp.int32), mask_loss=jnp.ones((b, t), jnp.int32),
               image=jnp.asarray(images), image_mask=jnp.ones((b,), jnp.int32))
  model = vlm.make_model(model_cfg)
  hidden = model.apply({"params": params}, batch)["hidden"]
  return [np.asarray(model.apply({"params": params}, h, method=vlm.VLM.logits)) for h in hidden]


def test_recursified_steps_reproduce_the_original_model(hf_dirs):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  path = hf_dirs["llava_qwen2_layer-2"]
  imp = importer.load_hf(path)
  model_cfg, params = recursify.recursify(imp.model, imp.params, num_steps=3)
  assert model_cfg.recursion.mode == "connector" and model_cfg.recursion.num_steps == 3
  assert all(not np.any(v) for p, v in _flat(params).items() if p.endswith("connector/proj"))
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, hf_models.IMAGE_TOKEN, size=(2, 10))
  images = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(
      path, dtype="float32", attn_implementation="eager").eval()
  ids = torch.cat([torch.full((2, 16), hf_models.IMAGE_TOKEN), torch.from_numpy(tokens)], 1)
  with torch.no_grad():
    ref = hf(input_ids=ids, pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
             ).logits[:, 16:].numpy()
  by_step = _rvlm_logits_by_step(model_cfg, params, tokens, images)
  assert len(by_step) == 3
  for step, logits in enumerate(by_step, 1):
    assert np.max(np.abs(logits - ref)) < TOL, f"step {step}"


@pytest.mark.parametrize("name", ["llava_llama_tied_layer-1", "qwen2_gqa_untied"])
def test_import_export_import_is_identical_and_transformers_loads_it(hf_dirs, tmp_path, name):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from rvlm import inference  # pylint: disable=g-import-not-at-top
  vision = None
  if name.startswith("qwen2"):  # a decoder + a SigLIP tower: the causal_lm layout
    vision = hf_models.siglip(str(tmp_path / "siglip"), seed=3)
  first = importer.load_hf(hf_dirs[name], vision_dir=vision)
  # A recursive model: the connector (not an HF part) must survive the round trip too.
  model_cfg, params = recursify.recursify(first.model, first.params, num_steps=2, seed=5)
  params = dict(params)
  flat = traverse_util.flatten_dict(params, sep="/")
  flat = {p: v + 0.01 if "connector/proj" in p else v for p, v in flat.items()}
  first = importer.Imported(model=model_cfg, params=traverse_util.unflatten_dict(flat, sep="/"),
                            tokenizer=first.tokenizer, hf_dir=first.hf_dir,
                            tokenizer_dir=first.tokenizer_dir, notes=[])
  workdir = importer.write_workdir(first, str(tmp_path / "imported"))
  loaded = inference.load(workdir)
  out = exporter.export(loaded.config, loaded.params, str(tmp_path / "exported"))
  second = importer.load_hf(out)

  a, b = _flat(first.params), _flat(second.params)
  assert sorted(a) == sorted(b)
  for p in a:
    np.testing.assert_array_equal(a[p], b[p], err_msg=p)
  strip = lambda m: {k: v for k, v in m.to_dict().items() if k != "hf"}  # noqa: E731
  assert strip(second.model) == strip(first.model)
  assert os.path.exists(os.path.join(out, "tokenizer.json"))

  # transformers loads the standard parts with no missing or unexpected weights, and
  # they compute what the original did.
  if name.startswith("llava"):
    cls, arch_dirs = transformers.LlavaForConditionalGeneration, [(hf_dirs[name], out)]
  else:
    cls, arch_dirs = transformers.Qwen2ForCausalLM, [(hf_dirs[name], out)]
    reloaded, info = transformers.SiglipVisionModel.from_pretrained(
        os.path.join(out, "vision_tower"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
  for original, exported in arch_dirs:
    reloaded, info = cls.from_pretrained(exported, output_loading_info=True,
                                         attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    orig = cls.from_pretrained(original, attn_implementation="eager")
    ids = torch.randint(0, hf_models.IMAGE_TOKEN, (2, 7))
    with torch.no_grad():
      np.testing.assert_allclose(reloaded.eval()(input_ids=ids).logits.numpy(),
                                 orig.eval()(input_ids=ids).logits.numpy(), atol=1e-5)


# ---- bad input: an error naming the keys / field, and nothing written ---------------------

def _copy(src, dst):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(src, dst)
  return str(dst)


def _rewrite(path, edit):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def _expect_refusal(hf_dir, tmp_path, match):
  out = tmp_path / "out"
  with pytest.raises(ConversionError, match=match):
    importer.write_workdir(importer.load_hf(hf_dir), str(out))
  assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_missing_shard_is_named(hf_dirs, tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top
  d = str(tmp_path / "sharded")
  transformers.LlamaForCausalLM.from_pretrained(hf_dirs["llama_gqa_untied"]).save_pretrained(
      d, max_shard_size="20KB")
  with open(os.path.join(d, "model.safetensors.index.json"), encoding="utf-8") as f:
    shards = sorted(set(json.load(f)["weight_map"].values()))
  assert len(shards) > 2
  assert importer.load_hf(d).model.decoder.depth == 2  # sharded reads like one file
  os.remove(os.path.join(d, shards[1]))
  _expect_refusal(d, tmp_path, rf"shard\(s\) {shards[1]} .* are missing; they hold ")


def test_bfloat16_checkpoint_is_widened_to_float32(hf_dirs, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  d = str(tmp_path / "bf16")
  model = transformers.Qwen2ForCausalLM.from_pretrained(hf_dirs["qwen2_gqa_untied"])
  model.to(torch.bfloat16).save_pretrained(d)
  params = _flat(importer.load_hf(d).params)
  q = params["recursion/step/stack/layers/layer/attn/q/kernel"]
  assert q.dtype == np.float32
  want = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T.reshape(32, 4, 8)
  np.testing.assert_array_equal(q[1], want)


def test_unexpected_and_missing_keys_are_named(hf_dirs, tmp_path):
  d = _copy(hf_dirs["qwen2_mqa_tied"], tmp_path / "extra")
  _rewrite(os.path.join(d, "model.safetensors"),
           lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}))
  _expect_refusal(d, tmp_path, r"unexpected keys model\.layers\.0\.self_attn\.q_norm\.weight")
  d = _copy(hf_dirs["qwen2_mqa_tied"], tmp_path / "missing")
  _rewrite(os.path.join(d, "model.safetensors"),
           lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  _expect_refusal(d, tmp_path, r"missing keys model\.layers\.1\.mlp\.up_proj\.weight")


def test_shape_mismatch_names_the_key(hf_dirs, tmp_path):
  d = _copy(hf_dirs["llama_gqa_untied"], tmp_path / "shape")
  cfg_path = os.path.join(d, "config.json")
  with open(cfg_path, encoding="utf-8") as f:
    cfg = json.load(f)
  cfg["intermediate_size"] = 40
  with open(cfg_path, "w", encoding="utf-8") as f:
    json.dump(cfg, f)
  _expect_refusal(d, tmp_path, r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight has shape")


@pytest.mark.parametrize("field,value,match", [
    ("architectures", ["GPT2LMHeadModel"], r"architectures=\['GPT2LMHeadModel'\]"),
    ("hidden_act", "gelu", r"hidden_act='gelu'"),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4}, r"rope_type='llama3'"),
])
def test_unsupported_architecture_names_the_field(hf_dirs, tmp_path, field, value, match):
  d = _copy(hf_dirs["llama_gqa_untied"], tmp_path / "unsupported")
  cfg_path = os.path.join(d, "config.json")
  with open(cfg_path, encoding="utf-8") as f:
    cfg = json.load(f)
  cfg[field] = value
  with open(cfg_path, "w", encoding="utf-8") as f:
    json.dump(cfg, f)
  _expect_refusal(d, tmp_path, match)


def test_pickle_only_directory_is_refused(tmp_path):
  d = tmp_path / "pickle"
  d.mkdir()
  (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
  (d / "pytorch_model.bin").write_bytes(b"not read")
  _expect_refusal(str(d), tmp_path, r"pytorch_model\.bin, which rvlm does not read \(pickle\)")


def test_existing_output_is_not_overwritten(hf_dirs, tmp_path):
  out = tmp_path / "taken"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(ConversionError, match="exists and is not empty"):
    importer.write_workdir(importer.load_hf(hf_dirs["qwen2_mqa_tied"]), str(out))
  assert sorted(os.listdir(out)) == ["keep.txt"]


# ---- the command line -------------------------------------------------------------------

def _cli(*args):
  return subprocess.run([sys.executable, "-m", "rvlm.convert", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_cli_import_inspect_check_export(hf_dirs, tmp_path):
  out = str(tmp_path / "imported")
  r = _cli("import", f"--hf_dir={hf_dirs['llava_qwen2_layer-2']}", f"--out={out}")
  assert r.returncode == 0, r.stderr
  assert "llava: qwen2 decoder 2 layers" in r.stdout and "not used by rvlm" in r.stdout
  r = _cli("inspect", f"--workdir={out}")
  assert r.returncode == 0, r.stderr
  assert "recursion/step/stack/layers/layer/attn/q/bias" in r.stdout and "parameters" in r.stdout
  r = _cli("check", f"--hf_dir={hf_dirs['llava_qwen2_layer-2']}", "--tolerance=1e-4")
  assert r.returncode == 0, r.stdout + r.stderr
  assert r.stdout.count(" ok") == 4 and "full model" in r.stdout
  r = _cli("check", f"--hf_dir={hf_dirs['llava_qwen2_layer-2']}", "--tolerance=1e-12")
  assert r.returncode == 1 and "ABOVE TOLERANCE" in r.stdout
  r = _cli("export", f"--workdir={out}", f"--out={tmp_path / 'exported'}")
  assert r.returncode == 0, r.stderr
  assert os.path.exists(tmp_path / "exported" / "model.safetensors")
  r = _cli("recursify", f"--workdir={out}", f"--out={tmp_path / 'recursive'}", "--num_steps=4")
  assert r.returncode == 0, r.stderr
  r = _cli("inspect", f"--workdir={tmp_path / 'recursive'}")
  assert "recursion connector R=4" in r.stdout and "connector/proj" in r.stdout, r.stdout
  r = _cli("import", f"--hf_dir={tmp_path / 'nowhere'}", f"--out={tmp_path / 'x'}")
  assert r.returncode == 2 and "no such directory" in r.stderr
  assert not (tmp_path / "x").exists()


# ---- fine-tuning an imported model recursively --------------------------------------------

def _llava_records(tmp_path, n=16):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = tmp_path / "images"
  images.mkdir()
  for k in range(2):
    Image.new("RGB", (20, 18), (200 * k, 40, 90)).save(images / f"{k}.png")
  path = tmp_path / "train.jsonl"
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      rec = {"image": f"{i % 2}.png", "conversations": [
          {"from": "human", "value": f"<image>\nw{i % 5} w7 w9"},
          {"from": "gpt", "value": f"w{10 + i % 3}"}]}
      f.write(json.dumps(rec) + "\n")
  return path, images


def test_recursify_config_fine_tunes_an_imported_model_and_exports_it(hf_dirs, tmp_path):
  """The README's path: import a LLaVA, fine-tune it as a RecursiveVLM with
  configs/experiments/recursify.py, export it; transformers loads the export."""
  import transformers  # pylint: disable=g-import-not-at-top
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  imported = str(tmp_path / "imported")
  assert _cli("import", f"--hf_dir={hf_dirs['llava_qwen2_layer-2']}",
              f"--out={imported}").returncode == 0
  path, images = _llava_records(tmp_path)
  workdir = tmp_path / "recursive"
  cmd = [sys.executable, "-m", "rvlm.main", "--config=configs/experiments/recursify.py",
         f"--workdir={workdir}", f"--config.init_from={imported}",
         f"--config.data.train_json={path}", f"--config.data.eval_json={path}",
         f"--config.data.image_dir={images}", "--config.data.batch_size=8",
         "--config.train.total_steps=3", "--config.train.log_every=1",
         "--config.optim.warmup_steps=1", "--config.optim.lr=1e-3",
         "--config.eval.num_examples=8", "--config.eval.batch_size=8"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"config.model from {imported} (qwen2 decoder, 2 layers, vocab 64)" in r.stderr
  assert "freshly initialised (not in the checkpoint): recursion/step/connector" in r.stderr
  with open(workdir / "results.json", encoding="utf-8") as f:
    assert set(json.load(f)["accuracy_by_depth"]) == {"1", "2"}

  exported = tmp_path / "exported"
  r = _cli("export", f"--workdir={workdir}", f"--out={exported}")
  assert r.returncode == 0, r.stderr
  model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
      str(exported), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  with safe_open(str(exported / "rvlm_extra.safetensors"), "np") as f:
    proj = f.get_tensor("recursion/step/connector/proj")
  assert proj.shape == (2, 2, 32, 32) and np.any(proj)  # trained away from zero
  with open(exported / "rvlm_config.json", encoding="utf-8") as f:
    rvlm_model = json.load(f)
  assert {k: rvlm_model["recursion"][k] for k in ("mode", "num_steps", "impl")} == {
      "mode": "connector", "num_steps": 2, "impl": "scan"}


def test_predict_on_an_imported_llava_answers_as_transformers_generates(hf_dirs, tmp_path):
  """rvlm.predict's greedy cached decoding of an imported LLaVA gives the tokens
  transformers' generate() gives (image tokens first, then bos + prompt)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  path = hf_dirs["llava_qwen2_layer-2"]
  imported = importer.write_workdir(importer.load_hf(path), str(tmp_path / "imported"))
  Image.new("RGB", (30, 24), (250, 20, 90)).save(tmp_path / "x.png")
  r = subprocess.run([sys.executable, "-m", "rvlm.predict", f"--workdir={imported}",
                      "--prompt=w1 w2 w3", f"--image={tmp_path / 'x.png'}",
                      "--max_new_tokens=4"], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(
      path, attn_implementation="eager").eval()
  # rvlm's image preprocessing: bilinear resize to the tower's size, [-1, 1].
  img = np.asarray(Image.open(tmp_path / "x.png").convert("RGB").resize((16, 16),
                                                                        Image.BILINEAR))
  pixels = torch.from_numpy((img.astype(np.float32) / 127.5 - 1).transpose(2, 0, 1)[None].copy())
  ids = [hf_models.IMAGE_TOKEN] * 16 + [1] + tok.encode("w1 w2 w3", add_special_tokens=False).ids
  out = hf.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=4,
                    do_sample=False, eos_token_id=2, pad_token_id=0)
  expected = tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
  assert r.stdout.strip().splitlines()[-1] == expected
