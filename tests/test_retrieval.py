"""The retrieval study: chat prompts with needles at the depths asked for, whole answers, and each method paired
against dense item by item."""

import json

import numpy as np
import pytest

from psa_jax.bench import quality, retrieval
from tests import tiny_models


@pytest.fixture(scope="module")
def tokenizer():
  return tiny_models.smollm_tokenizer()


@pytest.mark.parametrize("kind", retrieval.KINDS)
def test_items_are_chat_prompts_of_the_exact_length_with_the_needle_at_its_depth(tokenizer, kind):
  context, n = 700, 5
  docs = quality.load_documents((), tokenizer, context + 256, add_bos=False)
  items = retrieval.make_items(tokenizer, docs, context, kind, n, seed=0)
  before, after = retrieval.chat_frame(tokenizer)
  assert [it.depth for it in items] == [0.0, 0.25, 0.5, 0.75, 1.0]
  for it in items:
    assert len(it.ids) == context and it.ids[:len(before)] == before and it.ids[-len(after):] == after
    assert it.ids[:2] != [tokenizer.bos_token_id] * 2  # no second BOS
    needle = tokenizer.decode(it.ids[slice(*it.needle_tokens)]).strip()
    text = tokenizer.decode(it.ids)
    question = text[text.rindex("\n\n"):]
    if kind == "variables":
      assert needle == f"VAR {it.answers[0]} = {needle.split('= ')[1]}" and needle.split("= ")[1][:-1] in question
      assert all(f"VAR {name} =" in text for name in it.answers)
    else:
      assert it.answers[0] in needle and all(a in text for a in it.answers)
      assert needle.split(" is ")[0].split(" of ")[-1] in question  # the needle's name is the one asked for
    # The needle sits at its depth of the haystack, to within the sentence it had to wait for.
    assert abs(it.placed - it.depth) < 0.1, (it.placed, it.depth)
    assert len(before) + it.placed * context * 0.7 <= it.needle_tokens[0] <= len(before) + it.placed * context + 150


def test_a_whole_answer_is_every_number_or_name_as_a_word():
  assert retrieval.is_right("The locker number is 261650.", ("261650",))
  assert not retrieval.is_right("The locker number is 2616.", ("261650",))
  assert not retrieval.is_right("It is 2616501.", ("261650",))  # a longer number is another number
  assert retrieval.is_right("ABCDE, FGHIJ and KLMNO", ("ABCDE", "KLMNO", "FGHIJ"))
  assert not retrieval.is_right("ABCDE and FGHIJX", ("ABCDE", "FGHIJ"))


def test_mcnemar_p_values_are_exact_binomial_tests():
  assert retrieval.mcnemar_p(0, 0) == 1.0
  assert retrieval.mcnemar_p(5, 0) == pytest.approx(2 / 32)
  assert retrieval.mcnemar_p(1, 9) == retrieval.mcnemar_p(9, 1) == pytest.approx(2 * 11 / 1024)
  assert retrieval.mcnemar_p(3, 3) == 1.0


def test_each_method_is_paired_with_dense_item_by_item():
  methods = retrieval.default_methods(taus=(0.9,), ks=())
  dense_right, psa_right = [True, True, False, True], [True, False, True, False]
  records = [dict(context=1024, kind="single", index=i, method=m, right=r, blocks=b, dense_blocks=10.0)
             for i, (d, p) in enumerate(zip(dense_right, psa_right))
             for m, r, b in (("dense", d, 10.0), ("psa@0.9", p, 4.0))]
  rows = {(r["kind"], r["method"]): r for r in retrieval.summarize(records, methods)}
  psa = rows[("single", "psa@0.9")]
  assert (psa["right"], psa["n"], psa["only_dense"], psa["only_method"]) == (2, 4, 2, 1)
  assert psa["mcnemar_p"] == pytest.approx(1.0) and psa["kv_share_read"] == pytest.approx(0.4)
  assert psa["ci_low"] < 0.5 < psa["ci_high"]
  assert rows[("single", "dense")]["only_dense"] == rows[("single", "dense")]["only_method"] == 0
  assert rows[("all", "psa@0.9")]["n"] == 4


@pytest.mark.slow
def test_the_study_runs_on_a_real_checkpoint_and_writes_every_answer(tmp_path):
  tiny_models.save_tiny_hf(tmp_path / "model", "llama", seed=3)
  config = retrieval.RetrievalConfig(model=str(tmp_path / "model"), contexts=(400,), kinds=("single", "multivalue"),
                                     items=2, methods=retrieval.default_methods(taus=(0.9,), ks=(4,)),
                                     answer_tokens=6)
  rows = retrieval.run(config, tmp_path / "out")
  assert {(r["kind"], r["method"], r["n"]) for r in rows} == {
      (k, m, n) for k, n in (("single", 2), ("multivalue", 2), ("all", 4)) for m in ("dense", "topk@4", "psa@0.9")}
  assert all(0 < r["kv_share_read"] <= 1 or r["kv_share_read"] == 0 for r in rows)
  items = json.loads((tmp_path / "out" / "retrieval_items.json").read_text())
  assert len(items) == 2 * 2 * 3 and all(set(i["answers"]) and "text" in i for i in items)
  assert (tmp_path / "out" / "retrieval.json").exists() and (tmp_path / "out" / "retrieval_400.png").stat().st_size


def test_a_lost_needle_is_lost_to_the_order_when_the_exact_order_would_have_read_it():
  from psa_jax.bench import needle_trace
  # Three heavy cells (dense mass >= 0.1): read; lost though the exact order had it within budget; lost to the stop.
  arrays = dict(dense_share=np.array([[[0.5, 0.2, 0.3, 0.01]]]), rank=np.array([[[1, 9, 9, 9]]]),
                exact_rank=np.array([[[1, 2, 7, 0]]]), used=np.array([[[4, 4, 4, 4]]]))
  arrays["read"] = arrays["rank"] < arrays["used"]
  got = needle_trace.attribute(arrays)
  assert (got["heavy"], got["read"], got["lost_to_order"], got["lost_to_stop"]) == (3, 1, 1, 1)
  assert got["lost_rank"] == 9 and got["lost_exact_rank"] == 4.5 and got["heavy_heads"] == 3


@pytest.mark.slow
def test_the_trace_reads_the_needle_everywhere_at_tau_one_and_nowhere_on_a_sink_and_local_budget(tmp_path):
  from psa_jax.bench import needle_trace
  from psa_jax.config import PSAConfig
  from psa_jax.models import checkpoint

  tiny_models.save_tiny_hf(tmp_path, "llama", seed=4)
  lm = checkpoint.load(str(tmp_path))
  prompt = list(range(100, 400))
  answer = [7, 8, 9, 10]
  needle = (100, 110)  # blocks 6 of 16-token blocks
  full = needle_trace.trace(lm, prompt, answer, needle, PSAConfig(tau=1.0), tau=1.0)
  c = lm.model.config
  assert full["rank"].shape == (3, c.num_layers, c.num_kv_heads)
  assert full["read"].all() and (full["used"] == (-(-np.array([301, 302, 303]) // 16))[:, None, None]).all()
  assert ((0 <= full["dense_share"]) & (full["dense_share"] <= 1)).all()
  forced_only = needle_trace.trace(lm, prompt, answer, needle, PSAConfig(tau=0.9, max_blocks=2), tau=0.9)
  assert not forced_only["read"].any() and (forced_only["used"] == 2).all() and (forced_only["rank"] >= 2).all()
  np.testing.assert_allclose(forced_only["dense_share"], full["dense_share"], rtol=1e-6)  # dense's, whatever PSA does


@pytest.mark.slow
def test_only_the_items_dense_answers_and_psa_misses_are_diagnosed(tmp_path):
  from psa_jax.models import checkpoint

  tiny_models.save_tiny_hf(tmp_path / "model", "llama", seed=3)
  lm = checkpoint.load(str(tmp_path / "model"))
  config = retrieval.RetrievalConfig(contexts=(300,), kinds=("single",), items=2,
                                     methods=retrieval.default_methods(taus=(0.9,), ks=()))
  docs = quality.load_documents((), lm.tokenizer, 300 + 256, add_bos=False)
  items = retrieval.make_items(lm.tokenizer, docs, 300, "single", 2, seed=0)
  right = {(0, "dense"): True, (0, "psa@0.9"): False, (1, "dense"): True, (1, "psa@0.9"): True}
  records = [dict(context=300, kind="single", index=i, method=m, right=r, text=f"{m} {i}", answer_ids=[5, 6, 7])
             for (i, m), r in right.items()]
  out = retrieval._diagnose(lm, items, records, config, tmp_path)
  assert [(d["index"], d["method"], d["psa_text"], d["dense_text"]) for d in out] == [(0, "psa@0.9", "psa@0.9 0",
                                                                                       "dense 0")]
  d = out[0]
  assert d["heavy"] == d["read"] + d["lost_to_order"] + d["lost_to_stop"]
  assert np.asarray(d["rank"]).shape == (2, lm.model.config.num_layers, lm.model.config.num_kv_heads)
  assert (tmp_path / "retrieval_diagnosis.json").exists() and (tmp_path / "retrieval_diagnosis.png").stat().st_size
