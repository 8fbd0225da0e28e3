"""The unified KV arena: one preallocated pool of pages shared by every layer and every sequence.

The device side is a `PagedKV` (pages + block summaries). The host side is the page pool
(psa_jax/serving/pages.py): a free list and, per sequence, the pages it holds for each layer. Pages move between
the free list and sequences only between device calls; block tables are rebuilt from the host lists and
uploaded as small int arrays.

Forked sequences share the pages of their common prefix and copy only the page still being filled: sixteen
samples of a 128K-token prompt hold one copy of its KV, not sixteen.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from psa_jax.models import parallel
from psa_jax.models.config import ModelConfig
from psa_jax.models.kv_pages import PagedKV
from psa_jax.pallas_kernels.summaries import BlockSummaries
from psa_jax.serving.config import parse_memory
from psa_jax.serving.pages import ArenaFull, PagePool


@functools.partial(jax.jit, donate_argnums=0)
def _copy_pages(kv: PagedKV, src: jax.Array, dst: jax.Array) -> PagedKV:
  # Pages move along axis 1; a head-sharded arena (axis 0) stays where it is, shard by shard.
  return jax.tree.map(lambda x: x.at[:, dst].set(x[:, src]), kv)


def page_bytes(config: ModelConfig, block_size: int, dtype) -> int:
  """Device bytes of one page stored as `dtype`: K and V tiles plus one row per BlockSummaries field, for all KV
  heads."""
  item = jnp.dtype(dtype).itemsize
  return config.num_kv_heads * config.head_dim * item * (2 * block_size + len(BlockSummaries._fields))


def device_memory_bytes() -> int:
  """Memory of the first device; on CPU, the machine's physical memory."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class KVArena(PagePool):
  """The page pool (psa_jax/serving/pages.py) plus the device pages it hands out, `kv`."""

  def __init__(self, config: ModelConfig, *, num_pages: int, block_size: int, dtype, mesh: Mesh | None = None):
    super().__init__(config.num_layers, num_pages, block_size)
    self.config = config
    self.mesh = mesh
    self.dtype = dtype
    self.kv = self._zeros()

  def _zeros(self) -> PagedKV:
    kv = PagedKV.zeros(self.config.num_kv_heads, self.num_pages, self.block_size, self.config.head_dim, self.dtype)
    return kv if self.mesh is None else parallel.shard_kv(kv, self.mesh)  # split by KV head

  def reset(self) -> None:
    """Empty again, every page free, on fresh device arrays (a failed call loses the arena it was donated)."""
    PagePool.__init__(self, self.config.num_layers, self.num_pages, self.block_size)
    self.kv = self._zeros()

  @classmethod
  def from_budget(cls, config: ModelConfig, memory: str, *, block_size: int, dtype,
                  mesh: Mesh | None = None) -> "KVArena":
    """`memory` is per device; a page's bytes are split over the mesh's model axis."""
    budget = parse_memory(memory, total=device_memory_bytes())
    split = 1 if mesh is None else mesh.shape[parallel.MODEL]
    num_pages = budget * split // page_bytes(config, block_size, dtype)
    return cls(config, num_pages=num_pages, block_size=block_size, dtype=dtype, mesh=mesh)

  def copy_sequence(self, src: int, dst: int) -> None:
    """Gives `dst` its own pages holding a copy of `src`'s KV (and summaries). Raises ArenaFull if the pages are
    not there."""
    self.share_sequence(src, dst, written=0)

  def share_sequence(self, src: int, dst: int, written: int) -> None:
    """`share_pages`, with the pages still being filled copied on the device."""
    copy_from, copy_to = self.share_pages(src, dst, written)
    if copy_from.size:
      self.kv = _copy_pages(self.kv, jnp.asarray(copy_from), jnp.asarray(copy_to))
