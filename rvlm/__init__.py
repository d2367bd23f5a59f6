"""rvlm: recursive vision-language models (RecursiveVLM) in JAX/Flax."""
