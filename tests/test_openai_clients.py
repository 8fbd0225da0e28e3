"""Real clients against the real server: the official openai client's structured output, LangChain's
with_structured_output, and lm-evaluation-harness running a loglikelihood task and a generation task. All
offline: lm-eval's tasks read local files, and its tokenizer is a local directory or the server's own."""

import json
import os
import pathlib
import subprocess
import sys
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests import tiny_models
from tests.server_process import SMOLLM

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server + "/v1", api_key="none")


def test_json_schema_output_parses_and_validates(client):
  out = client.chat.completions.create(
      model=SMOLLM, max_tokens=96, temperature=0, n=2,
      messages=[{"role": "user", "content": "Describe a programmer as JSON with name, age and languages."}],
      response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
  for choice in out.choices:
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_and_vllm_guided_fields(client):
  obj = client.chat.completions.create(
      model=SMOLLM, max_tokens=64, temperature=0.7, seed=3, response_format={"type": "json_object"},
      messages=[{"role": "user", "content": "Give the capital of France as a JSON object."}])
  if obj.choices[0].finish_reason == "stop":  # a sampled string may run past max_tokens; a finished one parses
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
  else:
    assert obj.choices[0].message.content.startswith("{")
  choice = client.completions.create(model=SMOLLM, prompt="Is the sky blue? Answer:", max_tokens=8, temperature=1.0,
                                     extra_body={"guided_choice": [" yes", " no"]})
  assert choice.choices[0].text in (" yes", " no")
  code = client.completions.create(model=SMOLLM, prompt="A US zip code:", max_tokens=8, temperature=0,
                                   extra_body={"structured_outputs": {"regex": " [0-9]{5}"}})
  assert len(code.choices[0].text) == 6 and code.choices[0].text[1:].isdigit()


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/missing"}}}},
     "response_format"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "b", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
])
def test_bad_constraints_are_refused_by_name(server, body, param):
  r = httpx.post(server + "/v1/chat/completions", timeout=120,
                 json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body})
  assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


class Capital(BaseModel):
  country: Literal["France", "Italy", "Spain"]
  city: str = Field(max_length=20)


def test_langchain_with_structured_output_returns_the_object(server):
  from langchain_openai import ChatOpenAI

  llm = ChatOpenAI(model=SMOLLM, base_url=server + "/v1", api_key="none", temperature=0, max_tokens=64)
  answer = llm.with_structured_output(Capital).invoke("What is the capital of France?")
  assert isinstance(answer, Capital) and answer.country in ("France", "Italy", "Spain")


# ------------------------------------------------------------------------------------------- lm-eval

MC_ITEMS = [
    ("What is the capital of France?", ["Paris", "Tokyo", "Nairobi", "Lima"], 0),
    ("How many legs does a dog have?", ["Two", "Four", "Eight", "Twelve"], 1),
    ("What color is the sky on a clear day?", ["Green", "Purple", "Blue", "Black"], 2),
    ("Which animal says meow?", ["Cow", "Dog", "Duck", "Cat"], 3),
    ("What is two plus two?", ["Four", "Nine", "Seventy", "Zero"], 0),
    ("Which of these is a fruit?", ["Hammer", "Apple", "Chair", "Cloud"], 1),
]


def write_task(folder: pathlib.Path, name: str, items: list[dict], spec: str) -> None:
  data = folder / f"{name}.jsonl"
  data.write_text("".join(json.dumps(i) + "\n" for i in items))
  (folder / f"{name}.yaml").write_text(
      f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n" + spec)


def run_lm_eval(tmp_path, *args) -> dict:
  env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
         "TOKENIZERS_PARALLELISM": "false"}
  out = tmp_path / "results"
  proc = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--include_path", str(tmp_path), "--output_path",
                         str(out), "--log_samples", *args], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads(next(out.rglob("results_*.json")).read_text())
  samples = [json.loads(line) for f in out.rglob("samples_*.jsonl") for line in f.read_text().splitlines()]
  return {"results": results["results"], "samples": samples}


@pytest.mark.slow
def test_lm_eval_local_completions_runs_a_multiple_choice_task(server, tmp_path):
  """lm-eval's loglikelihood path (echo + logprobs over token-id prompts) with a local tokenizer directory,
  every other setting its default."""
  write_task(tmp_path, "psa_mc", [{"question": q, "choices": c, "answer": a} for q, c, a in MC_ITEMS],
             'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
             'doc_to_choice: "{{choices}}"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n')
  tokenizer_dir = tmp_path / "tokenizer"
  tiny_models.save_smollm_tokenizer(tokenizer_dir)
  run = run_lm_eval(tmp_path, "--model", "local-completions", "--tasks", "psa_mc", "--model_args",
                    f"model={SMOLLM},base_url={server}/v1/completions,tokenizer={tokenizer_dir},"
                    "tokenizer_backend=huggingface")
  assert len(run["samples"]) == len(MC_ITEMS)
  assert run["results"]["psa_mc"]["acc,none"] >= 4 / 6  # easy questions; chance is 1/4
  # The scores are the model's: every choice got a finite log-likelihood.
  assert all(float(r[0][0]) < 0 for s in run["samples"] for r in s["resps"])


@pytest.mark.slow
def test_lm_eval_local_chat_completions_runs_a_generation_task(server, tmp_path):
  items = [{"question": "What is the capital of France? Answer in one word.", "answer": "Paris"},
           {"question": "What is the opposite of hot? Answer in one word.", "answer": "Cold"}]
  write_task(tmp_path, "psa_gen", items,
             'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
             'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 12\n  do_sample: false\n'
             'metric_list:\n  - metric: exact_match\n    ignore_case: true\n    ignore_punctuation: true\n')
  run = run_lm_eval(tmp_path, "--model", "local-chat-completions", "--tasks", "psa_gen", "--apply_chat_template",
                    "--model_args", f"model={SMOLLM},base_url={server}/v1/chat/completions")
  assert len(run["samples"]) == len(items)
  responses = [s["resps"][0][0] for s in run["samples"]]
  assert all(isinstance(r, str) and r.strip() for r in responses), responses
  assert any("paris" in r.lower() for r in responses), responses
  assert 0 <= run["results"]["psa_gen"]["exact_match,none"] <= 1


# ------------------------------------------------------------------------------------------- tool calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def tools_server(tmp_path_factory):
  """A tiny random model whose chat template renders tools (Hermes format): what it says is noise, so any call
  that parses is the constraint's doing."""
  from tests.server_process import QUICK, running_server

  path = tmp_path_factory.mktemp("tools_model")
  tiny_models.save_tiny_hf(path, "qwen2", seed=4, chat_template=tiny_models.TOOLS_TEMPLATE)
  with running_server(f"--model={path}", *QUICK, "--served_model_name=tiny", "--kv_memory=8MiB",
                      "--max_context=512") as (url, _):
    yield url


def test_forced_tool_calls_parse_and_follow_the_schema(tools_server):
  client = openai.OpenAI(base_url=tools_server + "/v1", api_key="none")
  messages = [{"role": "user", "content": "Weather in Paris?"}]
  named = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME], max_tokens=80,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
  choice = named.choices[0]
  assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
  call = choice.message.tool_calls[0]
  assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
  jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
  # "required", streamed: the call arrives as a tool_calls delta, then finish_reason "tool_calls".
  stream = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME], max_tokens=80,
                                          tool_choice="required", stream=True, temperature=1.0, seed=2)
  deltas, reasons = [], []
  for part in stream:
    for c in part.choices:
      deltas += c.delta.tool_calls or []
      reasons += [c.finish_reason] if c.finish_reason else []
  assert reasons == ["tool_calls"] and len(deltas) == 1 and deltas[0].function.name in ("get_weather", "get_time")
  json.loads(deltas[0].function.arguments)
  # The agent's next turn: the assistant's call (content null) and the tool's result go back in.
  follow = client.chat.completions.create(
      model="tiny", tools=[WEATHER], tool_choice="none", max_tokens=8,
      messages=messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                           {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}])
  assert follow.choices[0].message.tool_calls is None and isinstance(follow.choices[0].message.content, str)
  rendered = httpx.post(tools_server + "/tokenize", json={"messages": [
      *messages, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
      {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]}).json()["tokens"]
  text = httpx.post(tools_server + "/detokenize", json={"tokens": rendered}).json()["prompt"]
  assert "<tool_response>\n18 C, sunny\n</tool_response>" in text and '"name": "get_weather"' in text


@pytest.mark.parametrize("body,param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": ["get_weather"]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_tool_requests_are_refused_by_name(tools_server, body, param):
  r = httpx.post(tools_server + "/v1/chat/completions", timeout=120,
                 json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body})
  assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_tools_on_a_template_without_them_are_refused(server):
  r = httpx.post(server + "/v1/chat/completions", timeout=60,
                 json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "tools": [WEATHER]})
  assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
  assert "chat template" in r.json()["error"]["message"]
  turn = httpx.post(server + "/v1/chat/completions", timeout=60, json={"max_tokens": 4, "messages": [
      {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                           "function": {"name": "f", "arguments": "{}"}}]}]})
  assert turn.status_code == 400 and "chat template" in turn.json()["error"]["message"]
