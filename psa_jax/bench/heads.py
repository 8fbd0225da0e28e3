"""The retrieval-heads study: which (layer, KV head) pairs PSA should read densely (psa_jax/retrieval_heads.py).

On needle-free documents, the last `positions` queries of a `context`-token prefix are read densely, with every
layer's q/k/v captured, and each (query, layer, KV head) is run through PSA at its defaults. Its score is the
dense attention mass (the largest over the KV head's query heads) of the heaviest block PSA left unread: the most
a single skipped block held. A head whose skipped blocks stay light loses nothing PSA's tolerance did not allow;
a retrieval head is one where PSA skips a block that holds much of the head's attention. Per (layer, KV head), the
score is averaged over the queries and then over the documents; the `share` of the model's KV heads with the
highest scores are the model's dense heads. Their per-document ranks are printed beside them: a retrieval head is
a property of the model, so it ranks high on every text.

The default documents are standard-library texts that neither the quality study nor the retrieval study reads.
Writes heads.json (the scores, the ranks and the dense heads, in the form `--psa_dense_heads=PATH` reads, or
copied beside the model as `psa_dense_heads.json`) and heads.png (the score per layer and KV head).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from psa_jax.bench import common, fidelity, needle_trace, quality
from psa_jax.config import PSAConfig
from psa_jax.models import checkpoint

# (label, stdlib file, where the text starts); none of them is a document of the quality or retrieval study.
CALIBRATION_DOCUMENTS = (
    ("prose", "idlelib/NEWS.txt", None),
    ("prose", "idlelib/help.html", None),
    ("code", "doctest.py", None),
    ("code", "typing.py", None),
)


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
  model: str | None = None
  documents: tuple[str, ...] = ()  # text files; empty: CALIBRATION_DOCUMENTS
  context: int = 8192
  positions: int = 32  # the last queries before the context length, per document
  share: float = 1 / 32  # of the model's KV heads, read densely
  psa: PSAConfig = PSAConfig()
  block_size: int = 16

  def __post_init__(self):
    if not 0.0 <= self.share <= 1.0:
      raise ValueError(f"share must be in [0, 1], got {self.share}")
    if not 0 < self.positions < self.context:
      raise ValueError(f"positions must be in (0, context), got {self.positions}")


@functools.partial(jax.jit, static_argnames=("config", "group"))
def _unread_peak(q, k_pages, v_pages, tables, lengths, summaries, tau, *, config: PSAConfig, group: int):
  """[P, H]: dense attention's mass on the heaviest block PSA leaves unread (0 where it reads every block)."""
  position, used = needle_trace.psa_visits(q, k_pages, v_pages, tables, lengths, summaries, tau, config=config,
                                           group=group)
  mass = needle_trace.dense_block_mass(q, k_pages, tables, lengths, group=group)
  return jnp.max(jnp.where(position < used[..., None], 0.0, mass), axis=-1)


def _documents(paths, tokenizer, n_tokens):
  if paths:
    return quality.load_documents(tuple(paths), tokenizer, n_tokens)
  stdlib = pathlib.Path(quality._STDLIB)
  docs = []
  for kind, name, _ in CALIBRATION_DOCUMENTS:
    ids = tokenizer.encode((stdlib / name).read_text(errors="replace"))
    if len(ids) < n_tokens:
      raise ValueError(f"document {name} has {len(ids)} tokens, fewer than the {n_tokens} the study needs")
    docs.append((f"{kind}:{name}", ids[:n_tokens]))
  return docs


def scores(lm, ids: list[int], config: HeadsConfig) -> np.ndarray:
  """The mean unread peak per (layer, KV head) over the last `config.positions` queries of `ids`: [L, H]."""
  c = lm.model.config
  positions = list(range(len(ids) - config.positions, len(ids)))
  q, k, v = fidelity.capture(lm, ids, config.block_size)
  queries, k_pages, v_pages, tables, lengths, summaries = fidelity.paged_inputs(q, k, v, positions,
                                                                                config.block_size)
  p = len(positions)
  tau = jnp.full((p,), config.psa.tau, jnp.float32)
  out = []
  for layer in range(c.num_layers):
    rows = slice(layer * p, (layer + 1) * p)
    peak = _unread_peak(queries[rows], k_pages, v_pages, tables[rows], lengths[rows], summaries, tau,
                        config=config.psa, group=c.num_heads // c.num_kv_heads)
    out.append(np.asarray(jax.device_get(peak)).mean(axis=0))
  return np.stack(out)


def select(score: np.ndarray, share: float) -> tuple[tuple[int, int], ...]:
  """The ceil(share * heads) (layer, KV head) pairs of highest score, sorted."""
  n = math.ceil(share * score.size)
  flat = np.argsort(-score, axis=None, kind="stable")[:n]
  return tuple(sorted((int(i) // score.shape[1], int(i) % score.shape[1]) for i in flat))


def _ranks(score: np.ndarray) -> np.ndarray:
  """Rank of every (layer, head) by descending score, 0 the highest: [L, H]."""
  order = np.argsort(-score, axis=None, kind="stable")
  ranks = np.empty(score.size, int)
  ranks[order] = np.arange(score.size)
  return ranks.reshape(score.shape)


def run(config: HeadsConfig, out_dir) -> dict:
  out_dir = pathlib.Path(out_dir)
  common.progress(f"loading {config.model or checkpoint.DEFAULT_MODEL}")
  lm = checkpoint.load(config.model, dtype=jnp.float32)
  docs = _documents(config.documents, lm.tokenizer, config.context)
  per_doc = []
  t0 = time.perf_counter()
  for i, (label, ids) in enumerate(docs):
    per_doc.append(scores(lm, ids, config))
    common.progress(f"{label}: {i + 1}/{len(docs)} documents ({time.perf_counter() - t0:.0f} s)")
  score = np.mean(per_doc, axis=0)
  dense = select(score, config.share)
  ranks = [_ranks(s) for s in per_doc]
  top = np.argsort(-score, axis=None, kind="stable")[:max(10, len(dense))]
  rows = []
  for i in top:
    layer, head = int(i) // score.shape[1], int(i) % score.shape[1]
    rows.append({"layer": layer, "kv_head": head, "score": float(score[layer, head]),
                 "ranks": "/".join(str(int(r[layer, head])) for r in ranks), "dense": (layer, head) in dense})
  print("\n" + common.table(rows, ["layer", "kv_head", "score", "ranks", "dense"]))
  flag = ",".join(f"{layer}:{head}" for layer, head in dense) or "none"
  print(f"\n--psa_dense_heads={flag}")
  meta = {"model": config.model or checkpoint.DEFAULT_MODEL, "documents": [label for label, _ in docs],
          "context": config.context, "positions": config.positions, "share": config.share,
          "psa": dataclasses.asdict(config.psa), "dense_heads": [list(p) for p in dense],
          "score": score.tolist(), "score_per_document": [s.tolist() for s in per_doc]}
  path = common.save(out_dir, "heads", rows, meta)
  _heatmap(out_dir / "heads.png", score, dense, config)
  common.progress(f"wrote {path} and {out_dir / 'heads.png'}")
  return meta


def _heatmap(path, score, dense, config: HeadsConfig) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(4 + 0.5 * score.shape[1], 0.18 * score.shape[0] + 1.5))
  im = ax.imshow(score, aspect="auto", cmap="magma", vmin=0)
  for layer, head in dense:
    ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=1.5))
  ax.set_xticks(range(score.shape[1]))
  ax.set_xlabel("KV head")
  ax.set_ylabel("layer")
  ax.set_title(f"heaviest block PSA (tau {config.psa.tau:g}) leaves unread,\nmean over the last {config.positions} "
               f"queries at {config.context} tokens (boxed: read densely)", fontsize=9)
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
