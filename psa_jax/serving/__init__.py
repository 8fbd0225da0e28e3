"""Serving: the KV arena, the compiled prefill and decode-window steps, the continuous-batching engine and the
OpenAI-compatible HTTP server (`psa_jax.serving.http`, imported on its own: it needs fastapi)."""

from psa_jax.serving.arena import ArenaFull, KVArena
from psa_jax.serving.config import EngineConfig, SamplingParams
from psa_jax.serving.engine import Engine, Request

__all__ = ["ArenaFull", "Engine", "EngineConfig", "KVArena", "Request", "SamplingParams"]
