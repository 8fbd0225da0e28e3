"""Packed bfloat16 KV pages (psa_jax/pallas_kernels/storage.py): what is written is what is read, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psa_jax.models.kv_pages import PagedKV, gather_context, write_tokens
from psa_jax.pallas_kernels import storage
from psa_jax import summarize_pages


def test_pack_then_unpack_is_exactly_bfloat16_rounding():
  values = jnp.asarray([0.0, -0.0, 1.0, -2.5, 3.14159, 1e-30, -1e30, 65504.0, jnp.inf, -jnp.inf], jnp.float32)
  values = jnp.concatenate([values, jax.random.normal(jax.random.key(0), (1000,)) * 50])
  back = storage.unpack(storage.pack(values, storage.PACKED))
  assert back.dtype == jnp.float32
  want = values.astype(jnp.bfloat16).astype(jnp.float32)
  np.testing.assert_array_equal(np.asarray(back).view(np.uint32), np.asarray(want).view(np.uint32))
  assert np.isnan(np.asarray(storage.unpack(storage.pack(jnp.asarray([jnp.nan]), storage.PACKED)))).all()


@pytest.mark.parametrize("kv_dtype,backend,stored", [
    (jnp.bfloat16, "cpu", storage.PACKED), (jnp.bfloat16, "gpu", jnp.bfloat16),
    (jnp.float32, "cpu", jnp.float32), (jnp.float16, "cpu", jnp.float16)])
def test_only_bfloat16_on_cpu_is_packed(kv_dtype, backend, stored):
  assert storage.storage_dtype(kv_dtype, backend) == jnp.dtype(stored)


def test_unpacked_dtypes_pass_through_untouched():
  x = jnp.arange(6, dtype=jnp.bfloat16)
  assert storage.unpack(x) is x
  assert storage.pack(x, jnp.float32).dtype == jnp.float32


@pytest.mark.parametrize("dtype", [storage.PACKED, jnp.float32, jnp.bfloat16])
def test_value_dtype_is_what_unpack_returns(dtype):
  assert storage.value_dtype(dtype) == storage.unpack(jnp.zeros(3, dtype)).dtype


def test_a_packed_pool_is_written_read_and_summarized_as_its_bfloat16_values():
  rng = np.random.default_rng(1)
  heads, pages, s, d = 2, 8, 16, 8
  k_new = jnp.asarray(rng.standard_normal((2, 37, heads, d)), jnp.float32)
  v_new = jnp.asarray(rng.standard_normal((2, 37, heads, d)), jnp.float32)
  table = jnp.asarray([[0, 1, 2, 3], [4, 5, 6, 7]], jnp.int32)
  start, num = jnp.asarray([0, 0]), jnp.asarray([37, 20])

  packed = write_tokens(PagedKV.zeros(heads, pages, s, d, storage.PACKED), k_new, v_new, table, start, num)
  rounded = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
  plain = write_tokens(PagedKV.zeros(heads, pages, s, d, jnp.float32), rounded(k_new), rounded(v_new), table,
                       start, num)
  assert packed.k.dtype == storage.PACKED and all(x.dtype == storage.PACKED for x in packed.summaries)
  for got, want in ((packed.k, plain.k), (packed.v, plain.v)):
    np.testing.assert_array_equal(storage.unpack(got), want)
    np.testing.assert_array_equal(gather_context(got, table), gather_context(want, table))

  def same_summaries(packed_summaries, plain_summaries):
    # min and max of bfloat16 keys are exact; the half-boxes and the value mean are rounded to bfloat16 once, as
    # in a bfloat16 pool.
    for name, got, want in zip(packed_summaries._fields, packed_summaries, plain_summaries):
      want = rounded(want) if name in ("hmin", "hmax", "vmean") else want
      np.testing.assert_array_equal(storage.unpack(got), want, err_msg=name)

  same_summaries(packed.summaries, plain.summaries)
  ids, counts = jnp.arange(pages), jnp.asarray([16, 16, 5, 0, 16, 4, 0, 0])
  same_summaries(summarize_pages(packed.k, packed.v, ids, counts), summarize_pages(plain.k, plain.v, ids, counts))


def test_kv_dtype_names_resolve_against_the_model_dtype():
  assert storage.storage_dtype("model", "cpu", model_dtype=jnp.float32) == jnp.float32
  assert storage.storage_dtype("model", "cpu", model_dtype=jnp.bfloat16) == storage.PACKED
  assert storage.storage_dtype("bfloat16", "gpu", model_dtype=jnp.float32) == jnp.bfloat16
  with pytest.raises(ValueError, match="kv_dtype must be one of"):
    storage.storage_dtype("float8", "cpu")
  with pytest.raises(ValueError, match="needs the model"):
    storage.storage_dtype("model", "cpu")
