"""The retrieval study: chat prompts with needles at the depths asked for, whole answers, and each method paired
against dense item by item."""

import json

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
