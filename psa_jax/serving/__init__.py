"""Serving: requests and their settings, the page pool and KV arena, the scheduler, the model runner with its
compiled prefill and decode-window steps, the continuous-batching engine, and the OpenAI-compatible HTTP server
(`psa_jax.serving.http`, imported on its own: it needs fastapi)."""

from psa_jax.serving.arena import KVArena
from psa_jax.serving.config import AttentionDefaults, CacheConfig, EngineConfig, ParallelConfig
from psa_jax.serving.engine import Engine
from psa_jax.serving.pages import ArenaFull, PagePool
from psa_jax.serving.request import Request, SamplingParams, Status
from psa_jax.serving.scheduler import Scheduler, SchedulerConfig

__all__ = ["ArenaFull", "AttentionDefaults", "CacheConfig", "Engine", "EngineConfig", "KVArena", "PagePool",
           "ParallelConfig", "Request", "SamplingParams", "Scheduler", "SchedulerConfig", "Status"]
