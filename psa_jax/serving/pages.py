"""The arena's host side: which pages are free and which pages each sequence holds, layer by layer.

Plain Python and numpy, no device arrays: the scheduler plans with it and tests check it without JAX. A page
holds one block of one layer; every sequence holds the same number of blocks in each layer.

Sequences forked from one another share the pages their common prefix fills (a reference count per page):
nothing ever writes into a full page again, so only the page still being filled needs a copy of its own.
"""

from __future__ import annotations

import numpy as np


class ArenaFull(Exception):
  """Not enough free pages for an allocation; nothing was allocated."""


class PagePool:
  def __init__(self, num_layers: int, num_pages: int, block_size: int):
    if num_pages < num_layers:
      raise ValueError(f"an arena of {num_pages} pages cannot hold one block for each of {num_layers} layers")
    self.num_layers = num_layers
    self.num_pages = num_pages
    self.block_size = block_size
    self._free = list(range(num_pages - 1, -1, -1))  # a stack: recently freed pages are reused first
    self._refs = np.zeros(num_pages, np.int32)  # sequences holding each page
    self._pages: dict[int, list[list[int]]] = {}  # sequence id -> per layer, its pages in logical order

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
    return max(0, blocks - self.blocks(seq_id)) * self.num_layers

  def ensure(self, seq_id: int, tokens: int) -> None:
    """Grows the sequence's pages (in every layer) to hold `tokens` tokens, or raises ArenaFull."""
    need = self.pages_needed(seq_id, tokens)
    if need > len(self._free):
      raise ArenaFull(f"sequence {seq_id} needs {need} pages, {len(self._free)} free")
    pages = self._pages.setdefault(seq_id, [[] for _ in range(self.num_layers)])
    for layer_pages in pages:
      for _ in range(need // self.num_layers):
        page = self._free.pop()
        self._refs[page] = 1
        layer_pages.append(page)

  def share_pages(self, src: int, dst: int, written: int) -> tuple[np.ndarray, np.ndarray]:
    """Gives `dst` the pages of `src`: the first `written // block_size` blocks (full, never written again) are
    shared, the rest get fresh pages of `dst`'s own. Returns (source pages, destination pages) whose contents
    the caller copies. Raises ArenaFull, allocating nothing, if the fresh pages are not there."""
    if dst in self._pages:
      raise ValueError(f"sequence {dst} already holds pages")
    blocks = self.blocks(src)
    shared = min(blocks, max(0, written) // self.block_size)
    if (blocks - shared) * self.num_layers > len(self._free):
      raise ArenaFull(f"sequence {dst} needs {(blocks - shared) * self.num_layers} pages, {len(self._free)} free")
    src_layers = self._pages.get(src, [[] for _ in range(self.num_layers)])
    dst_layers = []
    for layer_pages in src_layers:
      own = [self._free.pop() for _ in range(blocks - shared)]
      self._refs[own] = 1
      self._refs[layer_pages[:shared]] += 1
      dst_layers.append(layer_pages[:shared] + own)
    self._pages[dst] = dst_layers
    copy_from = np.asarray([p[shared:] for p in src_layers], np.int32).reshape(-1)
    copy_to = np.asarray([p[shared:] for p in dst_layers], np.int32).reshape(-1)
    return copy_from, copy_to

  def release(self, seq_id: int) -> None:
    for layer_pages in self._pages.pop(seq_id, []):
      for page in reversed(layer_pages):
        self._refs[page] -= 1
        if self._refs[page] == 0:
          self._free.append(page)

  def block_tables(self, seq_ids: list[int | None], width: int) -> np.ndarray:
    """[layers, len(seq_ids), width] int32; None rows (batch padding) and unused columns hold page 0."""
    tables = np.zeros((self.num_layers, len(seq_ids), width), np.int32)
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
