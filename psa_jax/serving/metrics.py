"""Prometheus metrics of the server: vLLM's names and meanings under the `psa:` prefix (dashboards built for vLLM
read them with the prefix changed), plus PSA's own: how much of the KV each layer's attention reads."""

from __future__ import annotations

import prometheus_client as prom

from psa_jax.serving.compilation import compile_counter


class Metrics:
  """The server's registry: histograms observed when a request finishes, the rest read from the engine when
  scraped."""

  def __init__(self, engine):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    latency = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
    per_token = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
    self.success = prom.Counter("psa:request_success", "Finished requests by finish reason", ["finished_reason"],
                                registry=r)
    self.ttft = prom.Histogram("psa:time_to_first_token_seconds", "Time to first token", buckets=latency,
                               registry=r)
    self.itl = prom.Histogram("psa:inter_token_latency_seconds", "Time between successive output tokens",
                              buckets=per_token, registry=r)
    self.tpot = prom.Histogram("psa:request_time_per_output_token_seconds",
                               "A request's decode time per output token after the first", buckets=per_token,
                               registry=r)
    self.e2e = prom.Histogram("psa:e2e_request_latency_seconds", "Arrival to last token", buckets=latency,
                              registry=r)
    self.queue = prom.Histogram("psa:request_queue_time_seconds", "Arrival to admission", buckets=latency,
                                registry=r)
    self.prefill_time = prom.Histogram("psa:request_prefill_time_seconds", "Admission to first token",
                                       buckets=latency, registry=r)
    r.register(_EngineCollector(engine, compile_counter()))

  def finished(self, request) -> None:
    self.success.labels(request.finish_reason or "unknown").inc()
    if request.first_token_at is None:
      return
    self.ttft.observe(request.first_token_at - request.arrival)
    if request.admitted_at is not None:
      self.queue.observe(request.admitted_at - request.arrival)
      self.prefill_time.observe(max(0.0, request.first_token_at - request.admitted_at))
    if request.finished_at is not None:
      self.e2e.observe(request.finished_at - request.arrival)
      if len(request.output) > 1:
        per_token = (request.finished_at - request.first_token_at) / (len(request.output) - 1)
        self.tpot.observe(per_token)
        for _ in range(len(request.output) - 1):  # tokens of a window arrive together: each gets the mean gap
          self.itl.observe(per_token)


class _EngineCollector:
  """Values read from the engine at scrape time."""

  def __init__(self, engine, counter):
    self.engine, self.counter = engine, counter

  def collect(self):
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    e = self.engine
    stats = e.stats()
    yield GaugeMetricFamily("psa:num_requests_running", "Requests prefilling or decoding", stats["running"])
    yield GaugeMetricFamily("psa:num_requests_waiting", "Requests waiting for a slot or pages", stats["waiting"])
    yield GaugeMetricFamily("psa:kv_cache_usage_perc", "Share of KV arena pages in use (1 = full)",
                            stats["pages_used"] / max(stats["pages_total"], 1))
    yield CounterMetricFamily("psa:num_preemptions", "Requests preempted for pages", stats["preempted"])
    yield CounterMetricFamily("psa:prompt_tokens", "Prompt tokens admitted", stats["prompt_tokens"])
    yield CounterMetricFamily("psa:generation_tokens", "Tokens generated", stats["generated_tokens"])
    yield CounterMetricFamily("psa:compilations", "XLA compilations run by this process (persistent-cache hits "
                              "excluded)", self.counter.compiles)
    share = GaugeMetricFamily("psa:kv_read_share", "Share of the KV blocks the last decode window of each "
                              "attention kind read (1 = dense)", labels=["attention"])
    blocks = GaugeMetricFamily("psa:kv_blocks_read", "KV blocks read per KV head and step in the last decode "
                               "window of each attention kind, by layer", labels=["attention", "layer"])
    for kind, window in sorted(dict(e.last_window).items()):
      share.add_metric([kind], window["blocks_share"])
      for layer, value in enumerate(window["blocks_mean_per_layer"]):
        blocks.add_metric([kind, str(layer)], value)
    yield share
    yield blocks
