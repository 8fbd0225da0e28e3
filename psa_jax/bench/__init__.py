"""Benchmark studies; run them with `python -m psa_jax.bench`."""
