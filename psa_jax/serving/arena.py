"""The unified KV arena: one preallocated pool of pages shared by every layer and every sequence.

The device side is a `PagedKV` (pages + block summaries). The host side is a free list and, per sequence, the
pages it holds for each layer. Pages move between the free list and sequences only between decode windows;
block tables are rebuilt from the host lists and uploaded as small int arrays.

Sequences forked from one another share the pages their common prefix fills (a reference count per page):
nothing ever writes into a full page again, so only the page still being filled is copied. Sixteen samples of
a 128K-token prompt hold one copy of its KV, not sixteen.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from psa_jax.models import parallel
from psa_jax.models.config import ModelConfig
from psa_jax.models.kv_pages import PagedKV
from psa_jax.serving.config import parse_memory


@functools.partial(jax.jit, donate_argnums=0)
def _copy_pages(kv: PagedKV, src: jax.Array, dst: jax.Array) -> PagedKV:
  # Pages move along axis 1; a head-sharded arena (axis 0) stays where it is, shard by shard.
  return jax.tree.map(lambda x: x.at[:, dst].set(x[:, src]), kv)


def page_bytes(config: ModelConfig, block_size: int, dtype) -> int:
  """Device bytes of one page stored as `dtype`: K and V tiles plus four summary rows (BlockSummaries), for all KV heads."""
  item = jnp.dtype(dtype).itemsize
  return config.num_kv_heads * config.head_dim * item * (2 * block_size + 4)


def device_memory_bytes() -> int:
  """Memory of the first device; on CPU, the machine's physical memory."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class ArenaFull(Exception):
  """Not enough free pages for an allocation; nothing was allocated."""


class KVArena:
  def __init__(self, config: ModelConfig, *, num_pages: int, block_size: int, dtype, mesh: Mesh | None = None):
    if num_pages < config.num_layers:
      raise ValueError(f"an arena of {num_pages} pages cannot hold one block for each of {config.num_layers} layers")
    self.config = config
    self.block_size = block_size
    self.num_pages = num_pages
    self.mesh = mesh
    self.kv = PagedKV.zeros(config.num_kv_heads, num_pages, block_size, config.head_dim, dtype)
    if mesh is not None:  # split by KV head (psa_jax/models/parallel.py)
      self.kv = parallel.shard_kv(self.kv, mesh)
    self._free = list(range(num_pages - 1, -1, -1))  # a stack: recently freed pages are reused first
    self._refs = np.zeros(num_pages, np.int32)  # sequences holding each page
    self._pages: dict[int, list[list[int]]] = {}  # sequence id -> per layer, its pages in logical order

  @classmethod
  def from_budget(cls, config: ModelConfig, memory: str, *, block_size: int, dtype,
                  mesh: Mesh | None = None) -> "KVArena":
    """`memory` is per device; a page's bytes are split over the mesh's model axis."""
    budget = parse_memory(memory, total=device_memory_bytes())
    split = 1 if mesh is None else mesh.shape[parallel.MODEL]
    num_pages = budget * split // page_bytes(config, block_size, dtype)
    return cls(config, num_pages=num_pages, block_size=block_size, dtype=dtype, mesh=mesh)

  @property
  def free_pages(self) -> int:
    return len(self._free)

  @property
  def used_pages(self) -> int:
    return self.num_pages - len(self._free)

  def blocks(self, seq_id: int) -> int:
    pages = self._pages.get(seq_id)
    return len(pages[0]) if pages else 0

  def pages_needed(self, seq_id: int, tokens: int) -> int:
    """Pages an `ensure(seq_id, tokens)` would take from the free list."""
    blocks = -(-tokens // self.block_size)
    return max(0, blocks - self.blocks(seq_id)) * self.config.num_layers

  def ensure(self, seq_id: int, tokens: int) -> None:
    """Grows the sequence's pages (in every layer) to hold `tokens` tokens, or raises ArenaFull."""
    need = self.pages_needed(seq_id, tokens)
    if need > len(self._free):
      raise ArenaFull(f"sequence {seq_id} needs {need} pages, {len(self._free)} free")
    pages = self._pages.setdefault(seq_id, [[] for _ in range(self.config.num_layers)])
    per_layer = need // self.config.num_layers
    for layer_pages in pages:
      for _ in range(per_layer):
        page = self._free.pop()
        self._refs[page] = 1
        layer_pages.append(page)

  def copy_sequence(self, src: int, dst: int) -> None:
    """Gives `dst` its own pages holding a copy of `src`'s KV (and summaries). Raises ArenaFull if the pages are
    not there."""
    self.share_sequence(src, dst, written=0)

  def share_sequence(self, src: int, dst: int, written: int) -> None:
    """Gives `dst` the KV of `src`: the first `written // block_size` blocks (full, never written again) are
    shared, the rest of `src`'s pages are copied into pages of `dst`'s own. Raises ArenaFull, allocating
    nothing, if the copies do not fit."""
    if dst in self._pages:
      raise ValueError(f"sequence {dst} already holds pages")
    blocks = self.blocks(src)
    shared = min(blocks, max(0, written) // self.block_size)
    copied = (blocks - shared) * self.config.num_layers
    if copied > len(self._free):
      raise ArenaFull(f"sequence {dst} needs {copied} pages, {len(self._free)} free")
    src_layers = self._pages.get(src, [[] for _ in range(self.config.num_layers)])
    dst_layers = []
    for layer_pages in src_layers:
      own = [self._free.pop() for _ in range(blocks - shared)]
      self._refs[own] = 1
      self._refs[layer_pages[:shared]] += 1
      dst_layers.append(layer_pages[:shared] + own)
    self._pages[dst] = dst_layers
    if blocks > shared:
      src_pages = np.asarray([p[shared:] for p in src_layers]).reshape(-1)
      dst_pages = np.asarray([p[shared:] for p in dst_layers]).reshape(-1)
      self.kv = _copy_pages(self.kv, jnp.asarray(src_pages), jnp.asarray(dst_pages))

  def release(self, seq_id: int) -> None:
    for layer_pages in self._pages.pop(seq_id, []):
      for page in reversed(layer_pages):
        self._refs[page] -= 1
        if self._refs[page] == 0:
          self._free.append(page)

  def block_tables(self, seq_ids: list[int | None], width: int) -> np.ndarray:
    """[layers, len(seq_ids), width] int32; None rows (batch padding) and unused columns hold page 0."""
    tables = np.zeros((self.config.num_layers, len(seq_ids), width), np.int32)
    for row, seq_id in enumerate(seq_ids):
      for layer, layer_pages in enumerate(self._pages.get(seq_id, ()) if seq_id is not None else ()):
        tables[layer, row, : len(layer_pages)] = layer_pages[:width]
    return tables

  def check_whole(self) -> None:
    """Every page is free or held, and its reference count is the number of sequences holding it (the
    invariant tests check)."""
    held = np.zeros(self.num_pages, np.int32)
    for pages in self._pages.values():
      for layer in pages:
        np.add.at(held, np.asarray(layer, np.int64), 1)
    free = np.zeros(self.num_pages, np.int32)
    np.add.at(free, np.asarray(self._free, np.int64), 1)
    if np.any(free > 1) or np.any((free == 1) & (held > 0)) or np.any((free == 0) & (held == 0)):
      raise AssertionError(f"arena pages lost or duplicated: {int(np.sum(free))} free, "
                           f"{int(np.sum(held > 0))} held, of {self.num_pages}")
    if not np.array_equal(held, self._refs):
      raise AssertionError("arena reference counts disagree with the sequences holding the pages")
