"""Frozen configuration of the three decode attentions.

Every knob is a dataclass field, validated when the object is built, so a bad value fails where it is written
rather than deep inside a trace.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

# The kinds each knob may take are defined once, by the code that implements them.
from psa_jax.pallas_kernels.stopping import ESTIMATORS, TAILS
from psa_jax.pallas_kernels.summaries import SCORE_KINDS

ScoreKind = Literal["mean", "minmax", "hybrid"]
Estimator = Literal["score_mass", "last_chunk", "estimate", "value"]
Tail = Literal["mixed", "scores", "last_chunk"]
Impl = Literal["auto", "pallas", "xla", "reference"]
IMPLS = ("auto", "pallas", "xla", "reference")


def check_tau(tau, name: str = "tau") -> float:
  """PSA's threshold, checked here and nowhere else: a number in (0, 1] (1 visits every block, which is dense
  attention). Returns it as a float."""
  if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < float(tau) <= 1.0:
    raise ValueError(f"{name} must be a number in (0, 1], got {tau!r}")
  return float(tau)


def _check_nonneg(name: str, value: int) -> None:
  if not isinstance(value, int) or value < 0:
    raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _check_chunk(chunk_blocks: int) -> None:
  if not isinstance(chunk_blocks, int) or chunk_blocks < 1 or chunk_blocks & (chunk_blocks - 1):
    # The Triton lowering needs power-of-two tiles: a chunk is chunk_blocks * block_size tokens.
    raise ValueError(f"chunk_blocks must be a power of two >= 1, got {chunk_blocks!r}")


@dataclasses.dataclass(frozen=True)
class DenseConfig:
  """Exact paged decode attention.

  chunk_blocks: KV blocks folded into the online softmax per loop iteration.
  """

  chunk_blocks: int = 4

  def __post_init__(self):
    _check_chunk(self.chunk_blocks)


@dataclasses.dataclass(frozen=True)
class TopKConfig:
  """Quest-style fixed-budget sparse attention.

  Attends to the first `sink_blocks`, the last `local_blocks` and the `k_blocks` other blocks of highest
  estimated criticality. `score` picks the block summary the criticality comes from ("minmax" is Quest's
  per-channel upper bound, "mean" the mean-key logit, "hybrid" their average).
  """

  k_blocks: int = 32
  sink_blocks: int = 1
  local_blocks: int = 1
  chunk_blocks: int = 4
  score: ScoreKind = "minmax"

  def __post_init__(self):
    _check_nonneg("k_blocks", self.k_blocks)
    _check_nonneg("sink_blocks", self.sink_blocks)
    _check_nonneg("local_blocks", self.local_blocks)
    _check_chunk(self.chunk_blocks)
    if self.score not in SCORE_KINDS:
      raise ValueError(f"score must be one of {SCORE_KINDS}, got {self.score!r}")


@dataclasses.dataclass(frozen=True)
class PSAConfig:
  """Progressive Sparse Attention.

  Blocks are visited in descending estimated criticality, `chunk_blocks` per iteration; the loop stops once
  the stopping rule (`estimator`, see psa_jax/pallas_kernels/stopping.py) holds for every query head of the KV group at
  `patience` consecutive chunk boundaries, or after `max_blocks` blocks (None: no cap). Sink and local blocks are
  always visited first (within the cap), and then at least `min_blocks` more before the loop may stop (a top-k
  floor under the progressive rule).

  estimator: the stopping rule.
    "score_mass": from the block scores, sum over unvisited blocks of n_tokens * exp(score).
    "last_chunk": the mean mass per block of the chunk just visited, times the blocks left. Blocks come in
      descending criticality, so the last chunk is an upper estimate of what each remaining block holds.
    "estimate": never looks at exact masses; stops once the visited blocks hold `tau` of the *estimated*
      mass. This is the Twilight-style top-p baseline (select by estimate, prune to the smallest set reaching p),
      kept beside PSA so the two are compared on the same machinery.
    "value": value-aware; stops once the unread blocks would move the output by at most 1 - tau of its norm,
      estimated from the last chunk's mass and the value summaries (R / (G + R) * |v_unread - o|).
  score: the block summary behind the criticality ("mean": q . mean_k; "minmax": Quest's upper bound;
    "hybrid": their average).
  patience: chunk boundaries in a row at which the rule must hold.
  compensate: fold the unread blocks' estimated contribution (their mass estimate times their mean value) into
    the output; reads no KV, only the value summaries.
  tail: how "value" and `compensate` estimate the unread mass: "scores" (the last chunk's exact mass scaled by
    the block scores' ratio of unread to last-chunk mass), "last_chunk" (the last chunk's mass per block times
    the blocks left, an overestimate) or "mixed" (their geometric mean weighted by tau: the scores' estimate at a
    loose tolerance, the conservative one at a tight tolerance).
  tau = 1.0 visits every block and equals dense attention (with or without compensation: nothing is left).
  """

  # Defaults chosen by the quality study (BENCHMARKS.md, "Quality"; 8K, eight documents): the hybrid order, the
  # value-aware rule with a patience of two chunks and the mixed tail estimate reach Quest top-k's KL with 2.1-2.4x
  # fewer blocks at k = 32, 64 and 128. tau 0.9 reads 29% of the KV for a fifth of top-k 128's KL (25% of the KV)
  # and, of 0.8, 0.85 and 0.9, the only tau whose needle retrieval stays within dense's interval on all three
  # needle tasks (0.8, 20% of the KV, falls just outside it on two).
  tau: float = 0.9
  max_blocks: int | None = None
  min_blocks: int = 0
  sink_blocks: int = 1
  local_blocks: int = 1
  chunk_blocks: int = 4
  score: ScoreKind = "hybrid"
  estimator: Estimator = "value"
  patience: int = 2
  compensate: bool = False
  tail: Tail = "mixed"

  def __post_init__(self):
    if not isinstance(self.patience, int) or self.patience < 1:
      raise ValueError(f"patience must be an int >= 1, got {self.patience!r}")
    if not isinstance(self.compensate, bool):
      raise ValueError(f"compensate must be a bool, got {self.compensate!r}")
    check_tau(self.tau)
    if self.max_blocks is not None:
      _check_nonneg("max_blocks", self.max_blocks)
    _check_nonneg("min_blocks", self.min_blocks)
    _check_nonneg("sink_blocks", self.sink_blocks)
    _check_nonneg("local_blocks", self.local_blocks)
    _check_chunk(self.chunk_blocks)
    if self.score not in SCORE_KINDS:
      raise ValueError(f"score must be one of {SCORE_KINDS}, got {self.score!r}")
    if self.tail not in TAILS:
      raise ValueError(f"tail must be one of {TAILS}, got {self.tail!r}")
    if self.estimator not in ESTIMATORS:
      raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
