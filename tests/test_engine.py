"""The serving engine: batching equals running alone, one host read per window, pages never leak, no
recompilation once warm. A tiny random Llama keeps it fast; the real model is served in test_server."""

import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psa_jax.models.config import ModelConfig
from psa_jax.models.generate import generate
from psa_jax.models.kv_pages import PagedKV
from psa_jax.models.llama import Decoder
from psa_jax import AttentionBackend
from psa_jax.serving import steps
from psa_jax.serving.arena import ArenaFull, KVArena
from psa_jax.serving.config import CacheConfig, ParallelConfig, SamplingParams, parse_memory
from psa_jax.serving.engine import Engine
from tests.tiny_models import engine_config

TINY = ModelConfig(arch="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, intermediate_size=128, max_context=1024, eos_token_ids=(3,))


@pytest.fixture(scope="module")
def model():
  return Decoder(TINY, dtype=jnp.float32, rngs=nnx.Rngs(7))


def prompts(n, seed=0, lo=1, hi=120):
  rng = random.Random(seed)
  return [[rng.randrange(4, 256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def engine(model, **kw):
  num_pages = kw.pop("num_pages", 600)
  config = dict(attention="dense", max_batch=4, decode_window=8, prefill_chunk=32, max_context=1024)
  config.update(kw)
  return Engine(model, None, engine_config(**config), num_pages=num_pages)


@pytest.mark.slow
# Each attention with one KV dtype: the other pairings add compiles, not coverage (bfloat16 pages are held to
# their float32 values in test_attention).
@pytest.mark.parametrize("attention,tau,kv_dtype", [("dense", None, "model"), ("psa", 1.0, "bfloat16")])
def test_batched_greedy_output_equals_generate_alone(model, attention, tau, kv_dtype):
  ps = prompts(4, seed=1)
  eng = engine(model, attention=attention, kv_dtype=kv_dtype)
  outs = eng.generate(ps, SamplingParams(max_tokens=20), tau=tau)
  for p, out in zip(ps, outs):
    assert out == generate(model, p, max_new_tokens=20, attention=AttentionBackend.named("dense"), kv_dtype=kv_dtype)
  eng.arena.check_whole()
  assert eng.arena.used_pages == 0


@pytest.mark.slow
def test_sampled_output_does_not_depend_on_batching(model):
  ps = prompts(4, seed=2)
  params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=11)
  together = engine(model).generate(ps, params)
  alone = [engine(model, max_batch=1, decode_window=3).generate([p], params)[0] for p in ps]
  assert together == alone
  assert together == [generate(model, p, max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=11)
                      for p in ps]


def test_a_window_of_n_tokens_costs_one_host_read(model, monkeypatch):
  eng = engine(model, decode_window=8, max_batch=2)
  for p in prompts(2, seed=3, lo=10, hi=20):
    eng.submit(p, SamplingParams(max_tokens=30, stop_token_ids=()))
  while eng.prefilling or eng.waiting or eng._incoming:
    eng.step()
  reads = []
  real_get = jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda x: reads.append(1) or real_get(x))
  before = sum(len(r.output) for r in eng.running)
  with jax.transfer_guard_device_to_host("disallow"):  # any implicit read would raise
    eng.step()
  assert sum(len(r.output) for r in eng.running) - before == 2 * 8
  assert len(reads) == 1


def test_long_prompt_is_prefilled_in_chunks_between_decode_windows(model):
  eng = engine(model, prefill_chunk=16, decode_window=4)
  short = eng.submit(prompts(1, seed=4, lo=5, hi=5)[0], SamplingParams(max_tokens=200, stop_token_ids=()))
  eng.step()  # the short prompt is prefilled in one chunk and starts decoding
  long = eng.submit(prompts(1, seed=5, lo=200, hi=200)[0], SamplingParams(max_tokens=4))
  progress = []
  while long.state != "running" and long.state != "finished":
    eng.step()
    progress.append((long.prefilled, len(short.output)))
  assert len(progress) >= 200 // 16
  assert progress[-1][1] > progress[0][1] + 4 * (len(progress) - 2)  # decoding went on meanwhile


@pytest.mark.slow
def test_randomized_workload_keeps_greedy_outputs_and_returns_every_page(model):
  """Long and short prompts arriving while others decode, cancellations, and an arena small enough to force
  preemptions: every greedy request still produces what it produces alone, and every page comes back."""
  rng = random.Random(0)
  eng = engine(model, num_pages=30, max_batch=4, decode_window=4, prefill_chunk=32, max_num_batched_tokens=64)
  live = []
  for i in range(40):
    p = [rng.randrange(4, 256) for _ in range(rng.choice([rng.randint(1, 12), rng.randint(40, 120)]))]
    params = SamplingParams(max_tokens=rng.randint(1, 24), temperature=rng.choice([0.0, 0.7]), seed=i)
    live.append(eng.submit(p, params, attention=rng.choice(["dense", "psa", "topk"]), tau=rng.uniform(0.5, 1.0)))
    if rng.random() < 0.15:
      eng.cancel(rng.choice(live).id)
    if rng.random() < 0.3:
      for _ in range(rng.randint(1, 4)):
        eng.step()
  eng.run_until_idle(timeout=600)
  assert all(r.state == "finished" for r in live)
  assert {r.finish_reason for r in live} <= {"stop", "length", "cancelled"}
  assert eng.counters["preempted"] > 0  # the small arena forced preemption
  assert eng.arena.free_pages == eng.arena.num_pages
  eng.arena.check_whole()
  greedy = [r for r in live if r.finish_reason != "cancelled" and r.params.temperature == 0.0]
  assert len(greedy) > 8 and any(r.preemptions for r in greedy)
  # Each comparison compiles `generate` for its lengths: five, the preempted ones first, are enough.
  for r in sorted(greedy, key=lambda r: -r.preemptions)[:5]:
    alone = generate(model, r.prompt, max_new_tokens=r.params.max_tokens, attention=eng.runner.backends[r.attention],
                     tau=r.tau)
    assert r.output == alone, (r.id, r.attention, r.preemptions)


@pytest.mark.parametrize("policy", ["budget", "serial"])
def test_preempted_requests_produce_the_same_greedy_text(model, policy):
  ps = prompts(4, seed=6, lo=60, hi=80)
  roomy = engine(model).generate(ps, SamplingParams(max_tokens=40, stop_token_ids=()))
  tight = engine(model, num_pages=2 * 2 * 8, decode_window=8, scheduler_policy=policy)  # room for ~2 sequences
  outs = tight.generate(ps, SamplingParams(max_tokens=40, stop_token_ids=()))
  assert tight.counters["preempted"] > 0
  assert outs == roomy


def test_a_warmed_up_engine_compiles_nothing_on_a_mixed_workload(model):
  eng = engine(model, attention="psa", max_batch=2, decode_window=4, prefill_chunk=128, max_context=256)
  report = eng.warmup()
  assert report["shapes"] == 4 * 2 + 2 * 2  # prefill spans 16-128 x rows 1-2; decode rows 1-2 x widths 8, 16
  warm = dict(steps.TRACES)
  eng.generate(prompts(7, seed=9, lo=1, hi=100), SamplingParams(max_tokens=20, stop_token_ids=()))
  eng.generate(prompts(2, seed=10, lo=1, hi=100), SamplingParams(max_tokens=24), tau=0.7)
  assert dict(steps.TRACES) == warm
  assert eng.arena.used_pages == 0


def test_cancelled_and_failing_listeners_free_pages_and_keep_the_engine_alive(model):
  eng = engine(model)
  def broken(*_):
    raise RuntimeError("client went away")
  a = eng.submit(prompts(1, seed=11)[0], SamplingParams(max_tokens=50, stop_token_ids=()), listener=broken)
  b = eng.submit(prompts(1, seed=12)[0], SamplingParams(max_tokens=50, stop_token_ids=()))
  eng.step()
  eng.step()
  eng.cancel(b.id)
  eng.run_until_idle()
  assert a.finish_reason == "length" and len(a.output) == 50
  assert b.finish_reason == "cancelled"
  assert eng.arena.free_pages == eng.arena.num_pages


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt=[]), "at least one token"),
    (dict(prompt=[1, 999]), "token ids"),
    (dict(prompt=[5] * 1000, max_tokens=100), "exceeds the context"),
    (dict(attention="flash"), "attention"),
    (dict(tau=1.5), "tau"),
])
def test_bad_requests_are_rejected_without_touching_the_engine(model, kwargs, match):
  eng = engine(model)
  prompt = kwargs.pop("prompt", [5, 6])
  max_tokens = kwargs.pop("max_tokens", 4)
  with pytest.raises(ValueError, match=match):
    eng.submit(prompt, SamplingParams(max_tokens=max_tokens), **kwargs)
  assert not eng.has_work() and eng.arena.free_pages == eng.arena.num_pages


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0),
                                         ("top_k", -2), ("seed", -1)])
def test_bad_sampling_params_are_rejected(field, value):
  with pytest.raises(ValueError, match=field):
    SamplingParams(**{field: value})


def test_unknown_kv_dtype_is_rejected(model):
  with pytest.raises(ValueError, match="kv_dtype"):
    CacheConfig(kv_dtype="int4")
  with pytest.raises(ValueError, match="kv_dtype"):
    generate(model, [5, 6], max_new_tokens=2, kv_dtype="int4")


def test_unknown_layer_weights_layout_is_rejected():
  with pytest.raises(ValueError, match="layer_weights must be one of"):
    ParallelConfig(layer_weights="interleaved")


def test_memory_budget_spellings():
  assert parse_memory("2GiB", total=0) == 2 * 2**30
  assert parse_memory("512MB", total=0) == 512_000_000
  assert parse_memory("0.25", total=1000) == 250
  assert parse_memory(4096, total=0) == 4096
  with pytest.raises(ValueError, match="kv_memory"):
    parse_memory("lots", total=1)


def test_arena_from_budget_counts_pages_of_all_layers():
  arena = KVArena.from_budget(TINY, "1MiB", block_size=16, dtype=jnp.float32)
  assert arena.num_pages == 2**20 // (2 * 16 * (2 * 16 + 5) * 4)  # K and V tiles and five summary rows
  packed = KVArena.from_budget(TINY, "1MiB", block_size=16, dtype=jnp.uint16)  # bfloat16 bits
  assert packed.num_pages == 2**20 // (2 * 16 * (2 * 16 + 5) * 2)
  arena.ensure(0, 33)  # 3 blocks in each of 2 layers
  assert arena.used_pages == 6
  tables = arena.block_tables([0, None], 4)
  assert tables.shape == (2, 2, 4) and len(set(tables[:, 0, :3].ravel())) == 6


def test_shared_pages_are_freed_when_their_last_holder_releases_them():
  arena = KVArena(TINY, num_pages=16, block_size=16, dtype=jnp.float32)
  arena.ensure(0, 40)  # 3 blocks in each of 2 layers
  arena.share_sequence(0, 1, written=40)  # blocks 0-1 shared, block 2 copied
  tables = arena.block_tables([0, 1], 3)
  assert (tables[:, 0, :2] == tables[:, 1, :2]).all() and not (tables[:, 0, 2] == tables[:, 1, 2]).any()
  assert arena.used_pages == 8
  arena.check_whole()
  arena.release(0)
  assert arena.used_pages == 6  # the child still holds the shared blocks
  arena.check_whole()
  with pytest.raises(ArenaFull):
    arena.share_sequence(1, 2, written=0)  # a full copy needs 6 free pages, 10 are free...
    arena.share_sequence(1, 3, written=0)  # ...but not 12
  arena.release(1)
  arena.release(2)
  assert arena.used_pages == 0
  arena.check_whole()


def test_a_failed_share_allocates_nothing():
  arena = KVArena(TINY, num_pages=8, block_size=16, dtype=jnp.float32)
  arena.ensure(0, 64)  # 4 blocks x 2 layers: the whole arena
  with pytest.raises(ArenaFull):
    arena.share_sequence(0, 1, written=50)  # 3 blocks shared, 1 to copy per layer, nothing free
  assert arena.used_pages == 8 and arena.blocks(1) == 0
  arena.check_whole()


def compiled_window_text(eng, model, attention="psa"):
  """The optimized HLO of the engine's decode window for a batch of 2 and a 4-block table."""
  graphdef, state = nnx.split(model)
  b = 2
  args = (graphdef, state, eng.arena.kv, jnp.zeros((TINY.num_layers, b, 4), jnp.int32),
          steps.WindowState(jnp.zeros(b, jnp.int32), jnp.zeros(b, jnp.int32), jnp.ones(b, bool), jnp.ones(b, jnp.int32),
                            jnp.zeros(b, jnp.int32)),
          jnp.full((b, 1), -1, jnp.int32),
          steps.SamplingArrays(jnp.zeros(b, jnp.int32), jnp.zeros(b), jnp.ones(b), jnp.zeros(b, jnp.int32),
                               jnp.zeros(b), jnp.zeros(b), jnp.zeros(b), jnp.ones(b)),
          jnp.ones(b), eng._layers)
  lowered = steps.decode_window.lower(*args, attention=AttentionBackend.named(attention), num_steps=4)
  return lowered.compile().as_text()


@pytest.mark.parametrize("kv_dtype,arena_shape,layer_weights",
                         [("model", "f32[2,600,16,16]", "stacked"), ("bfloat16", "u16[2,600,16,16]", "stacked"),
                          ("bfloat16", "u16[2,600,16,16]", "split")])
def test_decode_window_updates_the_arena_in_place(model, kv_dtype, arena_shape, layer_weights):
  """The compiled window aliases the donated arena to its output: no copy of the KV pages, packed or not."""
  text = compiled_window_text(engine(model, kv_dtype=kv_dtype, layer_weights=layer_weights), model)
  aliases = text.split("input_output_alias=")[1].split("}\n")[0] if "input_output_alias=" in text else ""
  assert aliases.count("may-alias") + aliases.count("must-alias") >= 5, aliases[:500]
  arena_lines = [line for line in text.splitlines() if arena_shape in line]
  assert any(" scatter(" in line for line in arena_lines)  # the pages are written...
  copies = [line for line in arena_lines if " copy(" in line]
  assert not copies, copies[:3]  # ...and never copied


def test_split_layer_weights_are_read_in_place(model):
  """With per-layer weight arrays the window slices no weights out of stacked arrays; the stacked layout does
  (that per-step copy is what `layer_weights="split"` saves)."""
  def weight_slices(layer_weights):
    text = compiled_window_text(engine(model, layer_weights=layer_weights), model)
    return [line for line in text.splitlines()
            if "dynamic-slice" in line and re.search(r"= f32\[\d+,\d+\]", line)]
  assert weight_slices("stacked")
  assert not weight_slices("split")


@pytest.mark.parametrize("attention", ["dense", "psa"])
def test_split_layer_weights_decode_exactly_like_stacked(model, attention):
  ps = prompts(4, seed=5)
  split, stacked = (engine(model, attention=attention, layer_weights=w) for w in ("split", "stacked"))
  assert split.splits_layers and not stacked.splits_layers
  params = SamplingParams(max_tokens=16, stop_token_ids=())
  assert split.generate(ps, params) == stacked.generate(ps, params)
  assert split.telemetry[-1]["blocks_mean_per_layer"] == stacked.telemetry[-1]["blocks_mean_per_layer"]


def test_layer_weights_default_to_split_on_cpu(model):
  assert engine(model).splits_layers == (jax.default_backend() == "cpu")


def test_decode_rejects_layer_weights_of_another_depth(model):
  kv = PagedKV.zeros(TINY.num_kv_heads, 8, 16, TINY.head_dim, jnp.float32)
  tables = jnp.arange(8, dtype=jnp.int32).reshape(TINY.num_layers, 1, 4)
  with pytest.raises(ValueError, match="layers holds 1 layers' weights, the model has 2"):
    model.decode(jnp.array([5]), jnp.array([0]), kv, tables, AttentionBackend.named("dense"),
                 layers=model.split_layers()[:1])


def test_forked_requests_continue_exactly_like_their_parent(model):
  eng = engine(model)
  base = eng.submit(prompts(1, seed=13, lo=40, hi=40)[0], SamplingParams(max_tokens=60, stop_token_ids=()))
  while base.state != "running":
    eng.step()
  eng.hold(base)
  held = eng.arena.used_pages
  children = eng.fork(base, 3, SamplingParams(max_tokens=len(base.output) + 20, stop_token_ids=()))
  # The forks share the parent's full blocks and copy only the block still being filled.
  full_blocks = (len(base.context) - 1) // 16
  assert eng.arena.used_pages == held + 3 * (held - full_blocks * TINY.num_layers)
  eng.arena.check_whole()
  eng.run_until_idle()
  expected = generate(model, base.prompt, max_new_tokens=len(base.output) + 20, stop_ids=())
  assert all(c.output == expected for c in children)
  eng.cancel(base.id)
  eng.run_until_idle()
  assert eng.arena.free_pages == eng.arena.num_pages


def test_prefill_can_return_the_post_rope_keys_it_writes(model):
  from psa_jax.models.kv_pages import PagedKV, gather_context
  c = TINY
  tokens = jnp.asarray([prompts(1, seed=14, lo=40, hi=40)[0]])
  kv = PagedKV.zeros(c.num_kv_heads, 2 * 3, 16, c.head_dim, jnp.float32)
  tables = jnp.arange(6, dtype=jnp.int32).reshape(2, 1, 3)
  _, kv, (q, k, v) = model.prefill(tokens, jnp.zeros(1, jnp.int32), jnp.array([40]), kv, tables, collect_qkv=True)
  assert q.shape == (2, 1, 40, 4, 16) and k.shape == (2, 1, 40, 2, 16)
  for layer in range(2):
    stored = gather_context(kv.k, tables[layer])[0, :, :40]  # [H, T, D]
    np.testing.assert_array_equal(stored, jnp.moveaxis(k[layer, 0], 1, 0))


@pytest.mark.slow
def test_int8_weights_stay_close_to_float_and_serve(model):
  from psa_jax.models.kv_pages import PagedKV
  from psa_jax.models.quantize import quantize_int8
  q8 = quantize_int8(model)
  assert q8.wq[...].dtype == jnp.int8 and q8.embed[...].dtype == jnp.int8 and q8.dtype == jnp.float32
  assert model.wq[...].dtype == jnp.float32  # the float model is untouched
  tokens = jnp.asarray([prompts(1, seed=15, lo=30, hi=30)[0]])
  kv = PagedKV.zeros(2, 4, 16, 16, jnp.float32)
  tables = jnp.arange(4, dtype=jnp.int32).reshape(2, 1, 2)
  run = lambda m: m.logits(m.prefill(tokens, jnp.zeros(1, jnp.int32), jnp.array([30]), kv, tables)[0][0, -1])
  ref, got = np.asarray(run(model)), np.asarray(run(q8))
  assert np.abs(got - ref).max() / np.abs(ref).max() < 0.05
  out = engine(q8).generate(prompts(2, seed=16), SamplingParams(max_tokens=8))
  assert out == [generate(q8, p, max_new_tokens=8) for p in prompts(2, seed=16)]


@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_int8_matmul_is_close_to_float_and_each_row_ignores_the_others(rows):
  from psa_jax.models.llama import int8_matmul
  from psa_jax.models.quantize import _quantize

  rng = np.random.default_rng(rows)
  w = jnp.asarray(rng.normal(size=(64, 96)), jnp.float32)
  h = jnp.asarray(rng.normal(size=(rows, 64)) * rng.uniform(0.1, 10, size=(rows, 1)), jnp.float32)
  wq, scale = _quantize(w, axis=0)
  got = int8_matmul(h, wq, scale, contract=0)
  ref = h @ w
  assert got.shape == (rows, 96)
  assert float(jnp.abs(got - ref).max() / jnp.abs(ref).max()) < 0.02
  # Per-row activation scales and exact int32 sums: batching never changes a row's result.
  alone = jnp.concatenate([int8_matmul(h[i : i + 1], wq, scale, contract=0) for i in range(rows)])
  np.testing.assert_array_equal(got, alone)
  # The tied head contracts the other axis of a [N, K] matrix.
  np.testing.assert_array_equal(int8_matmul(h, wq.T, scale, contract=1), got)


@pytest.mark.slow
@pytest.mark.parametrize("kind,knob", [("topk", {"k_blocks": 0}), ("psa", {"tau": 0.3, "chunk_blocks": 1})])
def test_dense_layers_attend_densely_and_the_rest_stay_sparse(model, kind, knob):
  n_tokens, block = 300, 16
  width = -(-n_tokens // block) + 1
  tables = jnp.arange(TINY.num_layers * width, dtype=jnp.int32).reshape(TINY.num_layers, 1, width)
  kv = PagedKV.zeros(TINY.num_kv_heads, TINY.num_layers * width, block, TINY.head_dim, jnp.float32)
  tokens = jnp.asarray([prompts(1, seed=9, lo=n_tokens, hi=n_tokens)[0]], jnp.int32)
  _, kv = model.prefill(tokens, jnp.zeros(1, jnp.int32), jnp.array([n_tokens]), kv, tables)

  def decode(attention):
    logits, _, used = model.decode(jnp.array([5]), jnp.array([n_tokens]), kv, tables, attention)
    return np.asarray(logits), np.asarray(used)  # used [L, B, H]

  dense_logits, _ = decode(AttentionBackend.named("dense"))
  every_layer = AttentionBackend.named(kind, dense_layers=TINY.num_layers, **knob)
  np.testing.assert_allclose(decode(every_layer)[0], dense_logits, rtol=1e-5, atol=1e-5)
  _, used = decode(AttentionBackend.named(kind, dense_layers=1, **knob))
  n_blocks = -(-(n_tokens + 1) // block)
  assert (used[0] == n_blocks).all() and (used[1] < n_blocks).all()
  _, used = decode(AttentionBackend.named(kind, **knob))
  assert (used < n_blocks).all()


def full_forward_logprobs(model, tokens):
  """log_softmax of the model's logits at every position of `tokens`, by one dense prefill: the reference."""
  c = model.config
  width = -(-len(tokens) // 16)
  kv = PagedKV.zeros(c.num_kv_heads, c.num_layers * width, 16, c.head_dim, jnp.float32)
  tables = jnp.arange(c.num_layers * width, dtype=jnp.int32).reshape(c.num_layers, 1, width)
  x, _ = model.prefill(jnp.asarray([tokens], jnp.int32), jnp.zeros((1,), jnp.int32),
                       jnp.asarray([len(tokens)], jnp.int32), kv, tables)
  return np.asarray(jax.nn.log_softmax(model.logits(x[0]), axis=-1))


def test_logprobs_of_output_and_chunked_prompt_match_a_full_forward(model):
  eng = engine(model, prefill_chunk=32)
  prompt = prompts(1, seed=21, lo=70, hi=70)[0]
  r = eng.submit(prompt, SamplingParams(max_tokens=10, stop_token_ids=(), logprobs=3, prompt_logprobs=2))
  eng.run_until_idle()
  ref = full_forward_logprobs(model, prompt + r.output)
  assert len(r.logprobs) == 10 and len(r.prompt_logprobs) == len(prompt) and r.prompt_logprobs[0] is None
  for i, entry in enumerate(r.logprobs):
    position = len(prompt) - 1 + i
    assert entry.logprob == pytest.approx(ref[position, r.output[i]], abs=2e-4)
    assert [t for t, _ in entry.top] == list(np.argsort(-ref[position])[:3])
    assert entry.top[0][0] == r.output[i]  # greedy
  for j in range(1, len(prompt)):
    assert r.prompt_logprobs[j].logprob == pytest.approx(ref[j - 1, prompt[j]], abs=2e-4)
    assert len(r.prompt_logprobs[j].top) == 2


def test_n_samples_share_the_prompt_and_draw_like_separate_requests(model):
  eng = engine(model)
  prompt = prompts(1, seed=22, lo=50, hi=50)[0]
  params = SamplingParams(max_tokens=12, temperature=1.0, seed=40, stop_token_ids=())
  group = eng.submit_n(prompt, params, 3)
  eng.run_until_idle()
  separate = [eng.generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, seed=40 + i,
                                                    stop_token_ids=()))[0] for i in range(3)]
  assert [r.output for r in group] == separate
  assert len({tuple(r.output) for r in group}) > 1
  assert eng.counters["prefills"] >= 2  # the samples prefilled one token each, not the prompt
  eng.arena.check_whole()
  assert eng.arena.used_pages == 0


def test_cancelling_a_prompt_before_its_prefill_ends_its_samples(model):
  eng = engine(model)
  group = eng.submit_n(prompts(1, seed=23, lo=40, hi=40)[0], SamplingParams(max_tokens=8), 3)
  eng.cancel(group[0].id)
  eng.run_until_idle()
  assert [r.finish_reason for r in group] == ["cancelled"] * 3 and eng.arena.used_pages == 0


def test_min_tokens_holds_back_stop_tokens_and_penalties_steer_greedy_text(model):
  eng = engine(model)
  prompt = prompts(1, seed=24, lo=20, hi=20)[0]
  free = eng.generate([prompt], SamplingParams(max_tokens=6, stop_token_ids=()))[0]
  stopped = eng.generate([prompt], SamplingParams(max_tokens=6, stop_token_ids=(free[0],)))[0]
  assert stopped == [free[0]]
  held = eng.generate([prompt], SamplingParams(max_tokens=6, stop_token_ids=(free[0],), min_tokens=3))[0]
  assert len(held) >= 3 and free[0] not in held[:3]
  penalized = SamplingParams(max_tokens=16, stop_token_ids=(), frequency_penalty=2.0, presence_penalty=1.0)
  plain = eng.generate([prompt], SamplingParams(max_tokens=16, stop_token_ids=()))[0]
  together = eng.generate([prompt, prompt[:10]], penalized)
  assert together[0] != plain
  assert together[0] == engine(model, max_batch=1).generate([prompt], penalized)[0]  # batching changes nothing
  assert max(np.bincount(together[0])) < max(np.bincount(plain)) or len(set(plain)) == 16
