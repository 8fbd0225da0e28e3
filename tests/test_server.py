"""The real server process over real HTTP: OpenAI endpoints, streaming, the official client, bad input, load."""

import asyncio
import json

import httpx
import openai
import pytest

from tests import tiny_models
from tests.server_process import running_server


# No warm-up and no persistent cache: each test pays only for the shapes it meets and leaves no files behind.
QUICK = ("--nowarmup", "--compilation_cache_dir=none")
SMOLLM_FLAGS = ("--kv_memory=64MiB", "--max_context=1024", "--max_batch=4", "--decode_window=8",
                "--prefill_chunk=256", *QUICK)


@pytest.fixture(scope="module")
def server():
  with running_server(*SMOLLM_FLAGS) as (url, proc):
    yield url


def chat(url, content, **extra):
  body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": content}], "max_tokens": 16,
          "temperature": 0, **extra}
  return httpx.post(url + "/v1/chat/completions", json=body, timeout=300)


def test_models_health_and_metrics(server):
  models = httpx.get(server + "/v1/models").json()
  assert models["data"][0]["id"] == "smollm2-135m-instruct"
  assert httpx.get(server + "/health").json()["status"] == "ok"
  chat(server, "Hi")
  values = metric_values(server)
  assert sum(v for k, v in values.items() if k.startswith("psa:request_success_total{")) == 1
  generated = values["psa:generation_tokens_total"]
  assert generated >= 1 and values["psa:prompt_tokens_total"] > 10
  assert values["psa:time_to_first_token_seconds_count"] == 1
  assert values["psa:inter_token_latency_seconds_count"] == generated - 1
  assert values["psa:e2e_request_latency_seconds_count"] >= 1 and values["psa:request_queue_time_seconds_count"] >= 1
  assert values["psa:num_requests_running"] == 0 and values["psa:num_requests_waiting"] == 0
  assert values["psa:kv_cache_usage_perc"] == 0 and values["psa:num_preemptions_total"] == 0
  assert 0 < values['psa:kv_read_share{attention="psa"}'] <= 1
  layers = [k for k in values if k.startswith('psa:kv_blocks_read{attention="psa"')]
  assert len(layers) == 30  # one series per layer of SmolLM2-135M
  assert values["psa:compilations_total"] > 0


def metric_values(url) -> dict[str, float]:
  """The Prometheus text of /metrics as {"name{labels}": value}."""
  values = {}
  for line in httpx.get(url + "/metrics").text.splitlines():
    if line and not line.startswith("#"):
      name, value = line.rsplit(" ", 1)
      values[name] = float(value)
  return values


def test_a_restarted_server_answers_its_first_request_without_compiling(tmp_path):
  flags = ("--kv_memory=16MiB", "--max_context=256", "--max_batch=1", "--decode_window=4", "--prefill_chunk=64",
           "--max_num_batched_tokens=64", "--warmup", "--warmup_context=64", f"--compilation_cache_dir={tmp_path}")
  with running_server(*flags) as (url, _):
    assert metric_values(url)["psa:compilations_total"] > 0  # a cold start compiles the warm-up shapes
    first = chat(url, "Hi", max_tokens=4).json()["choices"][0]["message"]["content"]
  with running_server(*flags) as (url, _):
    again = chat(url, "Hi", max_tokens=4).json()["choices"][0]["message"]["content"]
    assert metric_values(url)["psa:compilations_total"] == 0
  assert again == first


def test_chat_completion_answers_and_reports_usage(server):
  r = chat(server, "What is the capital of France?", max_tokens=24)
  assert r.status_code == 200, r.text
  body = r.json()
  assert "Paris" in body["choices"][0]["message"]["content"]
  assert body["choices"][0]["finish_reason"] in ("stop", "length")
  assert body["usage"]["completion_tokens"] <= 24 and body["usage"]["prompt_tokens"] > 10


def test_streamed_chat_equals_unstreamed(server):
  plain = chat(server, "Name three colors.").json()["choices"][0]["message"]["content"]
  body = {"messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 16, "temperature": 0,
          "stream": True, "stream_options": {"include_usage": True}}
  pieces, lines = [], []
  with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=300) as r:
    assert r.headers["content-type"].startswith("text/event-stream")
    for line in r.iter_lines():
      if line:
        lines.append(line)
  assert lines[-1] == "data: [DONE]"
  chunks = [json.loads(line[6:]) for line in lines[:-1]]
  assert all(c["object"] == "chat.completion.chunk" for c in chunks)
  pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
  assert "".join(pieces) == plain
  assert chunks[-1]["usage"]["completion_tokens"] >= 1


def test_completions_with_stop_string_and_per_request_attention(server):
  body = {"prompt": "1, 2, 3, 4,", "max_tokens": 20, "temperature": 0, "stop": [" 7"],
          "psa": {"attention": "dense"}}
  r = httpx.post(server + "/v1/completions", json=body, timeout=300)
  assert r.status_code == 200, r.text
  text = r.json()["choices"][0]["text"]
  assert " 7" not in text and r.json()["choices"][0]["finish_reason"] == "stop"
  psa = httpx.post(server + "/v1/completions", json={**body, "psa": {"attention": "psa", "tau": 1.0}}, timeout=300)
  assert psa.json()["choices"][0]["text"] == text


def test_official_openai_client_works_unchanged(server):
  client = openai.OpenAI(base_url=server + "/v1", api_key="none")
  out = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=12, temperature=0,
                                       messages=[{"role": "user", "content": "Say hello."}])
  assert out.choices[0].message.content
  stream = client.completions.create(model="smollm2-135m-instruct", prompt="The sky is", max_tokens=8,
                                     temperature=0, stream=True)
  assert "".join(c.choices[0].text for c in stream if c.choices)
  assert [m.id for m in client.models.list()] == ["smollm2-135m-instruct"]


@pytest.mark.parametrize("path,payload,status,fragment", [
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", b"\xff\xfe{}", 400, "UTF-8"),
    ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/chat/completions", {"max_tokens": 4}, 400, "'messages' is required"),
    ("/v1/completions", {"max_tokens": 4}, 400, "'prompt' is required"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 400, "exceeds the context"),
    ("/v1/completions", {"prompt": "word " * 2000}, 400, "context"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-9"}, 404, "does not exist"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "temperature": 7}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "psa": {"tau": 2}}, 400, "psa.tau"),
    ("/v1/completions", {"prompt": "x", "psa": {"attention": "flash"}}, 400, "psa.attention"),
    ("/v1/completions", {"prompt": [1, 10**7]}, 400, "token ids"),
])
def test_bad_requests_get_openai_style_errors_and_the_server_keeps_serving(server, path, payload, status, fragment):
  kwargs = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
  r = httpx.post(server + path, headers={"content-type": "application/json"}, timeout=60, **kwargs)
  assert r.status_code == status, r.text
  error = r.json()["error"]
  assert fragment in error["message"] and error["type"]
  assert httpx.get(server + "/health").json()["status"] == "ok"


def test_client_disconnect_cancels_and_frees_pages(server):
  body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0.8, "stream": True}
  with httpx.stream("POST", server + "/v1/completions", json=body, timeout=300) as r:
    for line in r.iter_lines():
      if line.startswith("data: {"):
        break  # got a token; hang up
  for _ in range(100):
    health = httpx.get(server + "/health").json()
    if health["pages_used"] == 0 and health["running"] == 0:
      break
    asyncio.run(asyncio.sleep(0.1))
  assert health["pages_used"] == 0 and health["cancelled"] >= 1, health


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny")
  tiny_models.save_tiny_hf(path, "llama", seed=3)
  with running_server(f"--model={path}", *QUICK, "--served_model_name=tiny", "--kv_memory=4MiB", "--max_context=512",
                      "--max_batch=8", "--decode_window=8", "--prefill_chunk=64") as (url, proc):
    yield url


@pytest.mark.slow
def test_load_of_64_concurrent_mixed_requests(tiny_server):
  prompts = [f"request number {i} " + "lorem ipsum " * (i % 7 * 5) for i in range(8)]
  alone = {}
  for p in prompts:
    r = httpx.post(tiny_server + "/v1/completions", json={"prompt": p, "max_tokens": 24, "temperature": 0}, timeout=300)
    alone[p] = r.json()["choices"][0]["text"]
  bad = [{"prompt": "x", "max_tokens": -1}, {"prompt": ""}, {"messages": []}, {"prompt": "x", "top_p": 3}]

  async def main():
    async with httpx.AsyncClient(base_url=tiny_server, timeout=600) as client:
      jobs = []
      for i in range(64):
        if i % 8 == 7:
          jobs.append(client.post("/v1/completions", json=bad[i // 8 % len(bad)]))
        else:
          p = prompts[i % len(prompts)]
          jobs.append(client.post("/v1/completions", json={"prompt": p, "max_tokens": 24, "temperature": 0,
                                                           "stream": i % 3 == 0}))
      return await asyncio.wait_for(asyncio.gather(*jobs), timeout=600)

  responses = asyncio.run(main())
  for i, r in enumerate(responses):
    if i % 8 == 7:
      assert r.status_code == 400, r.text
      continue
    assert r.status_code == 200, r.text
    p = prompts[i % len(prompts)]
    if i % 3 == 0:
      events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
      text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    else:
      text = r.json()["choices"][0]["text"]
    assert text == alone[p], (i, text, alone[p])
  health = httpx.get(tiny_server + "/health").json()
  assert health["pages_used"] == 0 and health["running"] == 0 and health["waiting"] == 0


def test_sigterm_ends_in_flight_requests_and_exits_cleanly(tmp_path):
  import signal
  import threading
  tiny_models.save_tiny_hf(tmp_path, "llama", seed=4)
  with running_server(f"--model={tmp_path}", *QUICK, "--kv_memory=4MiB", "--max_context=512", "--shutdown_drain_s=1",
                      "--decode_window=4") as (url, proc):
    lines = []
    got_token = threading.Event()

    def client():
      body = {"prompt": "a b c", "max_tokens": 480, "temperature": 0.7, "stream": True}
      try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
          for line in r.iter_lines():
            lines.append(line)
            got_token.set()
      except httpx.HTTPError as e:
        lines.append(f"error: {e}")

    thread = threading.Thread(target=client)
    thread.start()
    assert got_token.wait(120)
    proc.send_signal(signal.SIGTERM)
    # uvicorn re-raises the SIGTERM it handled once shut down, so the exit status is -SIGTERM by design.
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert any(line.startswith("data: {") for line in lines)
    assert [line for line in lines if line][-1] == "data: [DONE]", lines[-3:]  # ended properly, not cut
