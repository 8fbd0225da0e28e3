"""Constrained decoding: the device automaton agrees with the host one token by token, and an engine whose
model is random noise still writes only what the grammar allows, greedy or sampled, alone or beside free text."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psa_jax.models.config import ModelConfig
from psa_jax.models.llama import Decoder
from psa_jax.serving import grammar
from psa_jax.serving.config import SamplingParams
from psa_jax.serving.engine import Engine
from tests.tiny_models import engine_config, smollm_tokenizer

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]},
                                           "code": {"type": "string", "pattern": "[a-z]{2}[0-9]"}},
          "required": ["ok", "size", "code"]}


@pytest.fixture(scope="module")
def tokenizer():
  return smollm_tokenizer()


@pytest.fixture(scope="module")
def vocab(tokenizer):
  return tokenizer.vocab_size


def automaton(tokenizer, vocab, kind, value):
  return grammar.compile_regex(tokenizer, vocab, grammar.regex_for(kind, value))


def test_token_bytes_spell_the_decoded_text(tokenizer):
  pieces = tokenizer.token_bytes()
  ids = tokenizer.encode('{"naïve": [1, 2.5e3]} 東京')
  assert b"".join(pieces[i] for i in ids).decode("utf-8") == tokenizer.decode(ids)
  assert all(pieces[i] is None for i in tokenizer.eos_token_ids)


@pytest.mark.parametrize("kind,value", [("json_schema", SCHEMA), ("json_object", None),
                                        ("regex", r"[0-9]{1,3}(\.[0-9])?"), ("choice", ["yes", "no", "not sure"])])
def test_device_automaton_follows_the_host_automaton(tokenizer, vocab, kind, value):
  """Random walks through the automaton: the device's allowed set and next state equal the host's, per row,
  with an unconstrained row and a second grammar in the same batch."""
  a = automaton(tokenizer, vocab, kind, value)
  # Only transitions that leave a state's default are stored: any JSON object needs millions otherwise.
  assert len(a.tokens) < 50 * a.num_states
  other = automaton(tokenizer, vocab, "choice", ["alpha", "beta"])
  table = grammar.GrammarTable(vocab)
  rng = np.random.default_rng(0)
  states = [0, 0, 0]
  for _ in range(12):
    c = table.constraint([a, None, other], states, 4)
    ok = np.asarray(grammar.allowed(c, vocab))
    assert ok[1].all() and ok[3].all()  # unconstrained and padding rows
    for row, aut in ((0, a), (2, other)):
      assert set(np.flatnonzero(ok[row])) == set(aut.allowed(states[row]).tolist())
    picks = [int(rng.choice(aut.allowed(s))) if aut is not None else 5 for aut, s in zip((a, None, other), states)]
    moved = grammar.advance(c, jnp.asarray(picks + [0], jnp.int32), jnp.asarray([True, True, True, False]))
    moved = np.asarray(moved.state)
    assert moved[1] == -1 and moved[3] == -1
    for row, aut in ((0, a), (2, other)):
      expected = aut.step(states[row], picks[row])
      assert expected is not None and moved[row] - table.offset(aut) == expected
      states[row] = expected


def test_schemas_that_cannot_compile_are_refused_with_the_reason(tokenizer, vocab):
  with pytest.raises(grammar.GrammarError, match="schema"):
    grammar.regex_for("json_schema", {"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}})
  with pytest.raises(grammar.GrammarError):
    automaton(tokenizer, vocab, "regex", "(unclosed")


@pytest.fixture(scope="module")
def noise_engine(tokenizer, vocab):
  """A random model over the real vocabulary: whatever it writes is the grammar's doing."""
  config = ModelConfig(arch="llama", vocab_size=vocab, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                       head_dim=16, intermediate_size=64, max_context=256, eos_token_ids=tokenizer.eos_token_ids)
  model = Decoder(config, dtype=jnp.float32, rngs=nnx.Rngs(3))
  return Engine(model, tokenizer, engine_config(attention="dense", max_batch=4, decode_window=8, prefill_chunk=32,
                                                max_context=256), num_pages=64)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_random_model_writes_only_what_the_grammar_allows(noise_engine, tokenizer, vocab, temperature):
  schema = automaton(tokenizer, vocab, "json_schema", SCHEMA)
  number = automaton(tokenizer, vocab, "regex", r"-?[1-9][0-9]{0,4}")
  prompt = tokenizer.encode("Answer:")
  requests = [noise_engine.submit(prompt, SamplingParams(max_tokens=60, temperature=temperature, seed=s, grammar=g))
              for s, g in enumerate([schema, number, None, schema])]
  noise_engine.run_until_idle()
  texts = [tokenizer.decode(r.output) for r in requests]
  for i in (0, 3):
    assert requests[i].finish_reason == "stop", texts[i]
    value = json.loads(texts[i])
    assert isinstance(value["ok"], bool) and value["size"] in "SML" and re.fullmatch("[a-z]{2}[0-9]", value["code"])
  assert requests[1].finish_reason == "stop" and re.fullmatch(r"-?[1-9][0-9]{0,4}", texts[1])
  assert requests[2].finish_reason == "length"  # free text runs on beside them
  noise_engine.arena.check_whole()
  assert noise_engine.arena.used_pages == 0


def test_min_tokens_gives_way_to_a_grammar_that_is_complete(noise_engine, tokenizer, vocab):
  done = automaton(tokenizer, vocab, "choice", ["ok"])
  r = noise_engine.submit(tokenizer.encode("Say ok:"), SamplingParams(max_tokens=20, min_tokens=10, grammar=done))
  noise_engine.run_until_idle()
  assert tokenizer.decode(r.output) == "ok" and r.finish_reason == "stop"


def test_ignore_eos_with_a_grammar_is_refused(noise_engine, tokenizer, vocab):
  with pytest.raises(ValueError, match="ignore_eos"):
    noise_engine.submit([1, 2], SamplingParams(ignore_eos=True, grammar=automaton(tokenizer, vocab, "choice", ["a"])))
