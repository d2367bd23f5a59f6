"""Model size presets.

A preset is a full `config.model` ConfigDict. Configs start from one and override
fields (`--config.model.decoder.depth=8`), so every size shares one schema.

`tiny`  : unit tests (a few thousand params, compiles in seconds).
`small` : the CPU default of configs/base.py.
`medium`: ~20M params, the larger CPU benchmark shape (benchmarks/run.py).
`1b`, `3b`: real-scale shapes (SigLIP-So400m/14 vision tower, Qwen2-class decoders);
           their parameter counts are checked with `jax.eval_shape` in the tests.
"""
import ml_collections


# The attention-plateau fix (rvlm/models/layers.py), for the decoder and the ViT alike;
# all off, so a preset's numerics and param tree are those without these options.
_ATTENTION_OPTIONS = dict(
    qk_norm=False,            # RMSNorm of each q / k head over head_dim (learned scale)
    logit_scale="none",       # none: 1/sqrt(head_dim); learned: x a per-head param
    logit_scale_init=1.0,     # its init (> 1 sharpens attention); 'learned' only
)


# Options that importing Hugging Face checkpoints (Llama / Qwen2 / SigLIP / LLaVA,
# rvlm/convert/) needs; the defaults keep rvlm's own param tree and numerics.
_DECODER_HF_OPTIONS = dict(
    qkv_bias=False,           # biases on attn q / k / v (Qwen2; Llama attention_bias)
    out_bias=False,           # bias on attn o (Llama attention_bias)
    mlp_bias=False,           # biases on mlp gate / up / down (Llama mlp_bias)
)
_VIT_HF_OPTIONS = dict(
    norm_eps=1e-6,            # eps of every ViT LayerNorm and the ViT QK-norm (HF: 1e-6 / 1e-5)
    final_norm=True,          # False: no ln_final (LLaVA reads a layer without post-layernorm)
)


def _model(*, vocab_size, vit, decoder, projector="mlp", tie_embeddings=True,
           remat_policy="none", recursion_impl="scan"):
  return ml_collections.ConfigDict(dict(
      vocab_size=vocab_size,
      tie_embeddings=tie_embeddings,
      # Compute dtype; params are always kept in param_dtype (f32 by default).
      dtype="float32",
      param_dtype="float32",
      # jax.checkpoint policy for one decoder layer: none | full | dots. The CPU
      # presets (small, medium) use dots with recursion.impl=loop: XLA:CPU pays more
      # to store every activation than to recompute it, and more again to stack a
      # layer scan's residuals into an outer scan's [R, L, ...] buffers; saving only
      # the matmul outputs, without the outer scan, ran 1.2x as fast as scan + full
      # on both presets, with the same parameters to the bit (docs/performance.md).
      remat_policy=remat_policy,
      # Scan over the L distinct decoder layers (True) or unroll them (False);
      # the param tree is identical either way.
      scan_layers=True,
      # prefix: image + prompt attend to each other, the answer is causal (PaliGemma);
      # causal: every position causal, image and prompt too (HF LLaVA / causal LMs).
      attention="prefix",
      vit=dict(vit, **_VIT_HF_OPTIONS, **_ATTENTION_OPTIONS),
      # act of the 'mlp' projector: gelu_tanh (tanh approximation) | gelu (exact erf,
      # LLaVA's projector_hidden_act='gelu'); the ViT's MLPs stay gelu_tanh.
      projector=dict(kind=projector, act="gelu_tanh"),
      decoder=dict(decoder, **_DECODER_HF_OPTIONS, **_ATTENTION_OPTIONS),
      recursion=dict(
          # none: standard transformer (R must be 1); vanilla: E_{r+1} = H_L^(r);
          # connector: RecursiveVLM.
          mode="connector",
          num_steps=3,
          # scan: outer nn.scan with broadcast params (compile time flat in R);
          # loop: Python loop over the same bound stack (compile time and, without
          # recursion-level remat, activation memory grow with R). Outputs are equal.
          impl=recursion_impl,
          # jax.checkpoint around each whole step: the backward pass keeps only the step
          # inputs and recomputes one step at a time, so activation memory barely grows
          # with R (for ~1 extra forward). Composes with remat_policy (per layer).
          remat=False,
      ),
      connector=dict(
          num_layers=4,              # k sampled layers: ceil(i*L/k), i = 1..k
          projection="linear",       # linear | mlp
          modality_specific=True,    # separate image / text weights
          fusion="mean",             # mean | softmax (learned weights over the k layers)
          base="embed",              # embed: E_0 + a*F; prev: E_r + a*F; none: F
          alpha_init=1.0,
          alpha_shape="channel",     # channel | scalar
          init="zeros",              # zeros | normal (projection kernel init)
      ),
  ))


def tiny():
  return _model(
      vocab_size=64,
      vit=dict(image_size=16, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64),
      decoder=dict(width=32, depth=4, num_heads=4, num_kv_heads=2, head_dim=8,
                   mlp_dim=64, rope_theta=10_000.0, norm_eps=1e-6),
  )


def small():
  return _model(
      vocab_size=256,
      vit=dict(image_size=32, patch_size=8, width=128, depth=2, num_heads=4, mlp_dim=256),
      decoder=dict(width=128, depth=4, num_heads=4, num_kv_heads=2, head_dim=32,
                   mlp_dim=384, rope_theta=10_000.0, norm_eps=1e-6),
      remat_policy="dots", recursion_impl="loop",
  )


_SO400M = dict(image_size=224, patch_size=14, width=1152, depth=27, num_heads=16,
               mlp_dim=4304)


def medium():
  # The CPU-sized benchmark model (benchmarks/run.py): ~20M params, with matmuls wide
  # enough (512) for a CPU's BLAS to approach its peak, unlike `small`'s 128.
  return _model(
      vocab_size=256,
      vit=dict(image_size=32, patch_size=8, width=256, depth=2, num_heads=4, mlp_dim=1024),
      decoder=dict(width=512, depth=6, num_heads=8, num_kv_heads=4, head_dim=64,
                   mlp_dim=1536, rope_theta=10_000.0, norm_eps=1e-6),
      remat_policy="dots", recursion_impl="loop",
  )


def rvlm_1b():
  # So400m/14 (~0.41B) + a Qwen2-0.5B-shaped decoder (28 layers; ~0.56B incl. tied embeddings).
  return _model(
      vocab_size=151_936,
      vit=_SO400M,
      decoder=dict(width=896, depth=28, num_heads=14, num_kv_heads=2, head_dim=64,
                   mlp_dim=4864, rope_theta=1_000_000.0, norm_eps=1e-6),
  )


def rvlm_3b():
  # So400m/14 (~0.43B) + a Qwen2.5-3B-shaped decoder, trimmed in depth to total ~3B.
  return _model(
      vocab_size=151_936,
      vit=_SO400M,
      decoder=dict(width=2048, depth=30, num_heads=16, num_kv_heads=2, head_dim=128,
                   mlp_dim=11008, rope_theta=1_000_000.0, norm_eps=1e-6),
  )


PRESETS = {"tiny": tiny, "small": small, "medium": medium, "1b": rvlm_1b, "3b": rvlm_3b}


def get_preset(name: str) -> ml_collections.ConfigDict:
  if name not in PRESETS:
    raise ValueError(f"config.model preset {name!r} is unknown; choose one of {sorted(PRESETS)}")
  return PRESETS[name]()


def with_option_defaults(model_config) -> ml_collections.ConfigDict:
  """`model_config` with every option it lacks set to its default (a copy).

  A checkpoint's saved config predates the options added since it was written (e.g.
  the HF-import biases); their defaults are what that model computed, so filling them
  in lets old workdirs load. Sizes are never filled: every saved config has them.
  """
  filled = ml_collections.ConfigDict(model_config.to_dict())
  defaults = small()
  for key, value in defaults.items():
    if key not in filled:
      filled[key] = value
    elif isinstance(value, ml_collections.ConfigDict):
      for sub, sub_value in value.items():
        if sub not in filled[key]:
          filled[key][sub] = sub_value
  return filled
