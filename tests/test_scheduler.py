"""The scheduler on its own: plain Python over requests and a page pool, no model and no device."""

import random

import pytest

from psa_jax.serving.pages import PagePool
from psa_jax.serving.request import Request, SamplingParams, Status
from psa_jax.serving.scheduler import MIN_SPAN, Scheduler, SchedulerConfig, bucket

LAYERS = 2


def make(config=SchedulerConfig(), pages=10_000, block_size=16):
  return Scheduler(config, PagePool(LAYERS, pages, block_size))


_ids = iter(range(10**9))


def request(prompt_len, max_tokens=16, attention="psa"):
  return Request(next(_ids), [7] * prompt_len, SamplingParams(max_tokens=max_tokens), attention, 0.9, (2,))


def prefill_all(s, chunks):
  """What the engine does after a prefill call: advance each chunk, start the ones whose context is in."""
  for ch in chunks:
    ch.request.prefilled += ch.length
    if ch.last:
      s.start_running(ch.request)
      ch.request.output.append(5)


def padded(chunks):
  return bucket(len(chunks)) * bucket(max(ch.length for ch in chunks), MIN_SPAN)


def test_a_queue_of_short_prompts_is_prefilled_together_in_one_step():
  s = make(SchedulerConfig(max_batch=8, max_num_batched_tokens=2048))
  queue = [request(n) for n in (40, 100, 7, 250, 64)]
  for r in queue:
    s.add(r)
  assert s.admit() == queue
  chunks = s.plan_prefill()
  assert [ch.request for ch in chunks] == queue and all(ch.last for ch in chunks)
  assert padded(chunks) <= 2048


def test_the_serial_policy_prefills_one_chunk_of_one_prompt_per_step():
  s = make(SchedulerConfig(max_batch=8, prefill_chunk=64, policy="serial"))
  for n in (40, 100):
    s.add(request(n))
  s.admit()
  chunks = s.plan_prefill()
  assert len(chunks) == 1 and chunks[0].length == 40


def test_a_long_prompt_is_cut_into_chunks_within_the_budget():
  s = make(SchedulerConfig(max_batch=4, max_num_batched_tokens=256, prefill_chunk=512))
  long = request(1000)
  s.add(long)
  s.admit()
  seen = []
  while long.state == Status.PREFILLING:
    chunks = s.plan_prefill()
    assert padded(chunks) <= 256
    seen.append(chunks[0].length)
    prefill_all(s, chunks)
  assert sum(seen) == 1000 and max(seen) == 256


@pytest.mark.parametrize("seed", range(5))
def test_every_plan_fits_the_token_budget_left_by_the_running_decodes(seed):
  rng = random.Random(seed)
  budget = rng.choice([64, 256, 512, 2048])
  s = make(SchedulerConfig(max_batch=8, max_num_batched_tokens=budget, prefill_chunk=rng.choice([32, 128, 512])))
  for _ in range(30):
    for _ in range(rng.randint(0, 3)):
      s.add(request(rng.randint(1, 700), max_tokens=rng.randint(1, 8)))
    s.admit()
    chunks = s.plan_prefill()
    if chunks:
      assert padded(chunks) <= max(MIN_SPAN, budget - len(s.running))
      assert all(ch.length <= s.config.prefill_chunk for ch in chunks)
    prefill_all(s, chunks)
    plan = s.plan_decode()
    for r in plan.batch if plan else []:
      r.output.append(5)
      if len(r.output) >= r.params.max_tokens:
        s.remove(r)
  s.pages.check_whole()


def test_decodes_run_every_step_while_a_long_prompt_is_prefilled():
  s = make(SchedulerConfig(max_batch=4, max_num_batched_tokens=128, prefill_chunk=128))
  short = request(10, max_tokens=1000)
  s.add(short)
  s.admit()
  prefill_all(s, s.plan_prefill())
  s.add(request(2000))
  s.admit()
  for _ in range(10):
    chunks = s.plan_prefill()
    assert chunks and chunks[0].request is not short
    prefill_all(s, chunks)
    plan = s.plan_decode()
    assert plan is not None and plan.batch == [short]


def test_windows_shrink_to_the_wall_time_target_once_a_step_is_measured():
  s = make(SchedulerConfig(decode_window=16, max_window_seconds=0.25))
  r = request(10, max_tokens=1000)
  s.add(r)
  s.admit()
  prefill_all(s, s.plan_prefill())
  assert s.plan_decode().steps == 16  # nothing measured yet
  s.observe_window("psa", 1, steps=16, seconds=16 * 0.1)  # 100 ms a step
  assert s.plan_decode().steps == 2
  s.observe_window("psa", 1, steps=2, seconds=2 * 0.001)
  s.observe_window("psa", 1, steps=2, seconds=2 * 0.001)  # the median is now 1 ms a step
  assert s.plan_decode().steps == 16
  serial = make(SchedulerConfig(decode_window=16, policy="serial"))
  serial.observe_window("psa", 1, steps=16, seconds=16.0)
  assert serial._window_steps("psa", 1) == 16


def test_kinds_take_turns_and_a_window_never_outlasts_its_longest_request():
  s = make()
  a, b = request(10, max_tokens=3, attention="psa"), request(10, max_tokens=50, attention="dense")
  for r in (a, b):
    s.add(r)
  s.admit()
  prefill_all(s, s.plan_prefill())
  first, second = s.plan_decode(), s.plan_decode()
  assert {first.kind, second.kind} == {"psa", "dense"}
  assert (first if first.kind == "psa" else second).steps == 2  # 3 tokens, one already sampled


def test_when_pages_run_out_the_newest_admission_is_preempted_and_queued_first():
  # Two 41-token contexts hold 3 blocks per layer each; a 16-step window needs a 4th for each: room for one.
  s = make(SchedulerConfig(max_batch=4, decode_window=16), pages=2 * LAYERS * 3 + LAYERS)
  old, new = request(40, max_tokens=40), request(40, max_tokens=40)
  for r in (old, new):
    s.add(r)
  s.admit()
  prefill_all(s, s.plan_prefill())
  plan = s.plan_decode()
  assert plan.preempted == [new] and plan.batch == [old]
  assert new.state == Status.WAITING and s.waiting[0] is new and new.preemptions == 1
  assert s.pages.blocks(new.id) == 0
  s.pages.check_whole()


def test_admission_is_first_come_first_served_when_pages_are_short():
  s = make(SchedulerConfig(max_batch=8), pages=LAYERS * 4)
  big, small = request(60), request(5)
  s.pages.ensure(-1, 20)  # someone holds 2 blocks per layer
  for r in (big, small):
    s.add(r)
  assert s.admit() == []  # the big one does not fit, and the small one does not jump the queue
  s.pages.release(-1)
  assert s.admit() == [big]


def test_max_batch_bounds_admissions():
  s = make(SchedulerConfig(max_batch=2))
  for _ in range(5):
    s.add(request(10))
  assert len(s.admit()) == 2 and len(s.waiting) == 3


@pytest.mark.parametrize("field,value", [("policy", "lifo"), ("max_batch", 0), ("max_num_batched_tokens", 8),
                                         ("max_window_seconds", 0.0), ("decode_window", 0)])
def test_bad_scheduler_settings_are_refused(field, value):
  with pytest.raises(ValueError, match=field.split("_")[0] if field != "policy" else "policy"):
    SchedulerConfig(**{field: value})


def test_the_scheduler_depends_on_nothing_but_requests_and_pages():
  """Its modules import no JAX, so scheduling decisions can be read and tested as plain Python."""
  import ast
  import pathlib
  import psa_jax.serving as serving
  folder = pathlib.Path(serving.__file__).parent
  for name in ("scheduler.py", "pages.py", "request.py"):
    tree = ast.parse((folder / name).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    outside = {m for m in imported if m.split(".")[0] in ("jax", "flax", "jaxlib")
               or (m.startswith("psa_jax") and m not in ("psa_jax.serving.pages", "psa_jax.serving.request"))}
    assert not outside, (name, outside)
