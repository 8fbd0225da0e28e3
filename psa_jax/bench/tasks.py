"""Study 3, task accuracy: RULER-style long-context retrieval generated offline, and perplexity on real text.

Tasks (a haystack of the pydoc topics' prose with facts hidden at random depths, then a question):
  niah_single        one "special magic number" for a key; retrieve it.
  niah_multikey      four keys with their numbers; retrieve one (the others distract).
  kv_retrieval       eight records with random-letter names; retrieve one record's value.
  variable_tracking  VAR a = N, VAR b = VAR a, VAR c = VAR b at increasing depths; give c's value.
An answer is right when the greedy continuation contains the expected 7-digit number. Perplexity: the model
reads `ppl_context - ppl_tokens` tokens of prose, then is teacher-forced through the next `ppl_tokens`.

The prompt is always prefilled densely, as in serving: the attention under test is the decode attention, so the
first answer token comes from the dense prefill and every later one from the method under test. Each prompt is
prefilled once; each method then decodes from the same KV (the cache is not donated, so every method starts
from it). Methods: dense, Quest top-k at several budgets, the Twilight-style top-p baseline at several p, PSA at
several tau. For each we report accuracy, perplexity and the share of KV blocks its decode steps read.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import string

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psa_jax.models import checkpoint
from psa_jax.models.kv_pages import PagedKV
from psa_jax.pallas_kernels.storage import storage_dtype
from psa_jax.backend import AttentionBackend
from psa_jax.bench import common
from psa_jax.config import PSAConfig

TASKS = ("niah_single", "niah_multikey", "kv_retrieval", "variable_tracking")
_WORDS = ("apple", "river", "candle", "mountain", "violin", "harbor", "lantern", "meadow", "falcon", "copper",
          "glacier", "orchid", "thunder", "saffron", "pebble", "compass")


@dataclasses.dataclass(frozen=True)
class TasksConfig:
  model: str | None = None
  contexts: tuple[int, ...] = (1024, 4096)
  samples: int = 2  # prompts per task and context (3 by flag: ~16 min here)
  tasks: tuple[str, ...] = TASKS
  topk_blocks: tuple[int, ...] = (4, 16, 64)
  topp: tuple[float, ...] = (0.7, 0.9)
  taus: tuple[float, ...] = (0.7, 0.9, 0.95)
  answer_tokens: int = 10
  ppl_context: int = 4096
  ppl_tokens: int = 128
  block_size: int = 16
  seed: int = 0
  kv_dtype: str = "bfloat16"  # EngineConfig.kv_dtype ("model": the weights' float32)


@dataclasses.dataclass(frozen=True)
class Method:
  family: str  # "dense", "topk", "topp", "psa"
  setting: float | int | None
  backend: AttentionBackend
  tau: float

  @property
  def name(self) -> str:
    return self.family if self.setting is None else f"{self.family}@{self.setting}"


def methods(config: TasksConfig) -> list[Method]:
  psa = AttentionBackend.named("psa")
  topp = AttentionBackend("psa", PSAConfig(estimator="estimate", chunk_blocks=1))  # Quest order, pruned to p
  return ([Method("dense", None, AttentionBackend.named("dense"), 1.0)]
          + [Method("topk", k, AttentionBackend.named("topk", k_blocks=k), 1.0) for k in config.topk_blocks]
          + [Method("topp", p, topp, p) for p in config.topp]
          + [Method("psa", t, psa, t) for t in config.taus])


# ----------------------------------------------------------------------------------------------- task prompts

@dataclasses.dataclass(frozen=True)
class Sample:
  task: str
  context: int
  ids: list[int]
  answer: str


def _number(rng: random.Random) -> str:
  return str(rng.randrange(1_000_000, 10_000_000))


def _facts(task: str, rng: random.Random) -> tuple[list[str], str, str]:
  """(fact sentences in depth order, question with its answer prefix, answer)."""
  if task == "niah_single":
    key, value = rng.choice(_WORDS), _number(rng)
    return ([f"The special magic number for {key} is {value}."],
            f"What is the special magic number for {key}?\nAnswer: The special magic number for {key} is", value)
  if task == "niah_multikey":
    keys = rng.sample(_WORDS, 4)
    values = [_number(rng) for _ in keys]
    facts = [f"The special magic number for {k} is {v}." for k, v in zip(keys, values)]
    i = rng.randrange(len(keys))
    return (facts, f"What is the special magic number for {keys[i]}?\nAnswer: The special magic number for "
            f"{keys[i]} is", values[i])
  if task == "kv_retrieval":
    names = ["".join(rng.choices(string.ascii_uppercase, k=6)) for _ in range(8)]
    values = [_number(rng) for _ in names]
    facts = [f"Record {n} has the value {v}." for n, v in zip(names, values)]
    i = rng.randrange(len(names))
    return facts, f"What is the value of record {names[i]}?\nAnswer: Record {names[i]} has the value", values[i]
  if task == "variable_tracking":
    a, b, c = ("".join(rng.choices(string.ascii_uppercase, k=3)) for _ in range(3))
    value = _number(rng)
    return ([f"VAR {a} = {value}.", f"VAR {b} = VAR {a}.", f"VAR {c} = VAR {b}."],
            f"Follow the assignments. What number does VAR {c} hold?\nAnswer: VAR {c} holds the number", value)
  raise ValueError(f"unknown task {task!r}")


def make_samples(tokenizer, config: TasksConfig) -> list[Sample]:
  """Prompts of exactly the requested context length (facts spliced into the haystack at sentence ends)."""
  rng = random.Random(config.seed)
  haystack = tokenizer.encode(common.prose(8 * max(config.contexts)))
  ends = [i + 1 for i, t in enumerate(haystack) if tokenizer.decode([t]).rstrip(" ").endswith((".", "\n"))]
  header = tokenizer.encode("Read the text below and remember the facts hidden in it.\n\n")
  samples = []
  for context in config.contexts:
    for task in config.tasks:
      for _ in range(config.samples):
        facts, question, answer = _facts(task, rng)
        fact_ids = [tokenizer.encode(" " + f + " ") for f in facts]
        question_ids = tokenizer.encode("\n\n" + question)
        room = context - len(header) - len(question_ids) - sum(map(len, fact_ids))
        depths = sorted(rng.uniform(0.05, 0.95) for _ in facts)
        cuts = [next((e for e in ends if e >= d * room), room) for d in depths]
        cuts = [min(c, room) for c in cuts]
        ids, last = list(header), 0
        for cut, fact in zip(cuts, fact_ids):
          ids += haystack[last:cut] + fact
          last = cut
        ids += haystack[last:room] + question_ids
        samples.append(Sample(task, context, ids, answer))
  return samples


# ------------------------------------------------------------------------------------------- device functions

@functools.partial(jax.jit, static_argnames=("graphdef", "width", "block_size", "kv_storage"))
def prefill(graphdef, state, tokens, n, *, width, block_size, kv_storage):
  """tokens [T] (padded), n valid. Returns (KV pool holding the prompt, greedy next token, its log-probs [V])."""
  model = nnx.merge(graphdef, state)
  c = model.config
  kv = PagedKV.zeros(c.num_kv_heads, c.num_layers * width, block_size, c.head_dim, kv_storage)
  tables = jnp.arange(c.num_layers * width, dtype=jnp.int32).reshape(c.num_layers, 1, width)
  x, kv = model.prefill(tokens[None], jnp.zeros((1,), jnp.int32), n[None], kv, tables)
  logp = jax.nn.log_softmax(model.logits(x[0, n - 1]))
  return kv, tables, jnp.argmax(logp).astype(jnp.int32), logp


@functools.partial(jax.jit, static_argnames=("graphdef", "attention", "steps"))
def decode_greedy(graphdef, state, kv, tables, first, start, forced, tau, *, attention, steps):
  """Decodes `steps` tokens after a prompt of `start` tokens, feeding `first` at position `start`.

  forced [steps]: the token to feed after step i (teacher forcing), or -1 to feed the greedy choice.
  Returns (greedy choice [steps], log-prob of forced[i] [steps], blocks read [steps], blocks dense reads
  [steps]), all summed over layers and KV heads.
  """
  model = nnx.merge(graphdef, state)
  c = model.config
  block_size = kv.k.shape[2]

  def step(carry, i):
    kv, token = carry
    position = start + i
    logits, kv, used = model.decode(token[None], position[None], kv, tables, attention, tau[None])
    logp = jax.nn.log_softmax(logits[0])
    greedy = jnp.argmax(logp).astype(jnp.int32)
    target = forced[i]
    dense_blocks = c.num_layers * c.num_kv_heads * (position // block_size + 1)
    out = (greedy, logp[jnp.maximum(target, 0)], jnp.sum(used), dense_blocks)
    return (kv, jnp.where(target >= 0, target, greedy)), out

  _, out = jax.lax.scan(step, (kv, first), jnp.arange(steps))
  return out


def table_width(tokens: int, block_size: int) -> int:
  return -(-tokens // block_size)


# ------------------------------------------------------------------------------------------------------ study

def run(config: TasksConfig, out_dir) -> list[dict]:
  common.progress(f"loading {config.model or checkpoint.DEFAULT_MODEL}")
  lm = checkpoint.load(config.model, dtype=jnp.float32)
  graphdef, state = nnx.split(lm.model)
  kv_storage = storage_dtype(config.kv_dtype, model_dtype=lm.model.dtype)
  methods_ = methods(config)
  tally = {m.name: {"correct": {}, "blocks": 0.0, "dense_blocks": 0.0} for m in methods_}

  samples = make_samples(lm.tokenizer, config)
  for i, sample in enumerate(samples):
    common.progress(f"[{i + 1}/{len(samples)}] {sample.task}, {sample.context} tokens")
    padded = bucket(len(sample.ids))
    width = table_width(padded + config.answer_tokens + 1, config.block_size)
    tokens = jnp.asarray(sample.ids + [0] * (padded - len(sample.ids)), jnp.int32)
    kv, tables, first, _ = prefill(graphdef, state, tokens, jnp.int32(len(sample.ids)), width=width,
                                    block_size=config.block_size, kv_storage=kv_storage)
    forced = jnp.full((config.answer_tokens,), -1, jnp.int32)
    for m in methods_:
      greedy, _, used, dense = jax.device_get(decode_greedy(
          graphdef, state, kv, tables, first, jnp.int32(len(sample.ids)), forced, jnp.float32(m.tau),
          attention=m.backend, steps=config.answer_tokens))
      text = lm.tokenizer.decode([int(first)] + [int(t) for t in greedy])
      key = (sample.task, sample.context)
      tally[m.name]["correct"].setdefault(key, []).append(sample.answer in text)
      tally[m.name]["blocks"] += float(used.sum())
      tally[m.name]["dense_blocks"] += float(dense.sum())

  ppl = perplexity(lm, graphdef, state, methods_, config, kv_storage)
  rows = []
  for m in methods_:
    t = tally[m.name]
    per_cell = {f"{task}@{ctx}": float(np.mean(v)) for (task, ctx), v in sorted(t["correct"].items())}
    rows.append({"method": m.family, "setting": m.setting,
                 "accuracy": float(np.mean([x for v in t["correct"].values() for x in v])),
                 "kv_share_read": t["blocks"] / max(t["dense_blocks"], 1.0),
                 "perplexity": ppl[m.name]["perplexity"], "ppl_kv_share_read": ppl[m.name]["kv_share_read"],
                 **per_cell})
  columns = ["method", "setting", "accuracy", "kv_share_read", "perplexity", "ppl_kv_share_read"]
  print("\n" + common.table(rows, columns))
  cells = [k for k in rows[0] if "@" in k]
  print("\nAccuracy per task and context:")
  print(common.table(rows, ["method", "setting", *cells]))
  common.save(out_dir, "tasks", rows, {"config": dataclasses.asdict(config)})
  families = ("topk", "topp", "psa")
  dense_row = rows[0]
  contexts = ", ".join(map(str, config.contexts))
  for metric, share, name, title in (
      ("accuracy", "kv_share_read", "tasks_accuracy", f"Retrieval accuracy vs KV read (contexts {contexts})"),
      ("perplexity", "ppl_kv_share_read", "tasks_perplexity", f"Perplexity vs KV read ({config.ppl_context} "
       f"tokens of prose)")):
    series = {f: ([r[share] for r in rows if r["method"] == f], [r[metric] for r in rows if r["method"] == f])
              for f in families}
    series["dense"] = ([dense_row[share]], [dense_row[metric]])
    common.plot(out_dir / f"{name}.png", title, "share of KV blocks read", metric, series)
  return rows


def perplexity(lm, graphdef, state, methods_, config: TasksConfig, kv_storage) -> dict:
  """Teacher-forced perplexity of each method over `ppl_tokens` tokens of prose after a dense prefill."""
  ids = lm.tokenizer.encode(common.prose(8 * config.ppl_context))[: config.ppl_context]
  n = len(ids) - config.ppl_tokens
  common.progress(f"perplexity: prefill {n} tokens, then {config.ppl_tokens} teacher-forced")
  padded = bucket(n)
  width = table_width(padded + config.ppl_tokens + 1, config.block_size)
  kv, tables, _, _ = prefill(graphdef, state, jnp.asarray(ids[:n] + [0] * (padded - n), jnp.int32),
                              jnp.int32(n), width=width, block_size=config.block_size, kv_storage=kv_storage)
  # Feed ids[n] at position n; step i predicts ids[n + 1 + i]. The first of those is the first read through
  # the method's attention (ids[n] itself was predicted by the dense prefill), so it is scored from there on.
  steps = config.ppl_tokens - 1
  forced = jnp.asarray(ids[n + 1 : n + 1 + steps], jnp.int32)
  out = {}
  for m in methods_:
    _, logp, used, dense = jax.device_get(decode_greedy(
        graphdef, state, kv, tables, jnp.int32(ids[n]), jnp.int32(n), forced, jnp.float32(m.tau),
        attention=m.backend, steps=steps))
    out[m.name] = {"perplexity": float(np.exp(-logp.mean())), "kv_share_read": float(used.sum() / dense.sum())}
    common.progress(f"perplexity {m.name}: {out[m.name]['perplexity']:.3f}")
  return out


def bucket(n: int) -> int:
  """Prompt lengths padded to multiples of 512 tokens, so contexts share compiled prefills."""
  return -(-n // 512) * 512
