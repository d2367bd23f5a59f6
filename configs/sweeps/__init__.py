"""Sweep files for `python -m rvlm.sweep` (the schema: rvlm/sweep.py)."""
