"""The README's Python examples run as written (with the inputs they leave to the reader filled in)."""

import pathlib
import re

import pytest

import jax.numpy as jnp
import numpy as np

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()


def python_block_after(heading: str) -> str:
  section = README.split(heading, 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_library_example_runs_on_a_paged_cache():
  from psa_jax.synthetic import synthetic_decode_inputs

  x = synthetic_decode_inputs(0, [100, 37], q_heads=4, kv_heads=2, head_dim=32)
  scope = dict(q=x.q, k_pages=x.k_pages, v_pages=x.v_pages, block_table=x.block_table, lengths=x.lengths,
               summaries=x.summaries)
  exec(python_block_after("## The library"), scope)
  assert scope["out"].shape == (2, 4, 32) and np.isfinite(np.asarray(scope["out"])).all()
  assert scope["blocks_used"].shape == (2, 2) and jnp.all(scope["blocks_used"] > 0)


@pytest.mark.slow
def test_engine_example_generates_from_the_default_model():
  code = python_block_after("## The engine and the model, from Python")
  scope = {}
  exec(code, scope)
  outputs = scope["outputs"]
  assert len(outputs) == 2 and all(0 < len(o) <= 32 for o in outputs)
