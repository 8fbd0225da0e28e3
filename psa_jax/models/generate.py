"""`generate`: prompt in, tokens out, for the library user. One sequence, its own small KV pool, the whole
decode loop on device. The serving engine (psa_jax/serving/) batches many requests over a shared arena instead."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from psa_jax.models.kv_pages import PagedKV
from psa_jax.models.llama import Decoder
from psa_jax.models.sampling import sample
from psa_jax.pallas_kernels.storage import storage_dtype
from psa_jax.backend import AttentionBackend


DENSE = AttentionBackend.named("dense")


def _bucket(n: int, minimum: int = 16) -> int:
  return max(minimum, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("graphdef", "attention", "max_new_tokens", "block_size", "kv_storage"))
def _generate(graphdef, state, tokens, n_prompt, n_new, stop_ids, temperature, top_p, top_k, tau, seed, *,
              attention, max_new_tokens, block_size, kv_storage):
  model = nnx.merge(graphdef, state)
  c = model.config
  t = tokens.shape[0]
  width = -(-(t + max_new_tokens) // block_size)
  kv = PagedKV.zeros(c.num_kv_heads, c.num_layers * width, block_size, c.head_dim, kv_storage)
  tables = jnp.arange(c.num_layers * width, dtype=jnp.int32).reshape(c.num_layers, 1, width)
  x, kv = model.prefill(tokens[None], jnp.zeros((1,), jnp.int32), n_prompt[None], kv, tables)
  logits = model.logits(x[0, n_prompt - 1])[None]
  knobs = (temperature[None], top_p[None], top_k[None])

  def step(carry):
    i, kv, logits, out, _ = carry
    position = (n_prompt + i)[None]
    token = sample(logits, seed[None], position, *knobs)
    out = out.at[i].set(token[0])
    done = jnp.any(token[0] == stop_ids)
    logits, kv, _ = model.decode(token, position, kv, tables, attention, tau[None])
    return i + 1, kv, logits, out, done

  def cond(carry):
    i, *_, done = carry
    return (i < n_new) & ~done

  out = jnp.full((max_new_tokens,), -1, jnp.int32)
  n, *_, out, _ = jax.lax.while_loop(cond, step, (jnp.int32(0), kv, logits, out, jnp.bool_(False)))
  return out, n


def generate(
    model: Decoder,
    prompt: list[int],
    *,
    max_new_tokens: int = 64,
    attention: AttentionBackend = DENSE,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    stop_ids: tuple[int, ...] | None = None,
    tau: float | None = None,
    block_size: int = 16,
    kv_dtype: str = "model",
) -> list[int]:
  """Generates up to `max_new_tokens` after `prompt` (token ids), stopping after a stop token (included in
  the result). Stop ids default to the model's eos tokens. Greedy when temperature is 0. kv_dtype: the KV
  cache's dtype, spelled as the engine's `EngineConfig.kv_dtype` ("model": the weights' dtype)."""
  if not prompt:
    raise ValueError("prompt must hold at least one token")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  c = model.config
  if len(prompt) + max_new_tokens > c.max_context:
    raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                     f"of {c.max_context} tokens")
  stop = tuple(c.eos_token_ids if stop_ids is None else stop_ids) or (-1,)
  t = _bucket(len(prompt))
  tokens = jnp.zeros((t,), jnp.int32).at[: len(prompt)].set(jnp.asarray(prompt, jnp.int32))
  if tau is None:
    tau = attention.config.tau if attention.kind == "psa" else 1.0
  graphdef, state = nnx.split(model)
  out, n = _generate(graphdef, state, tokens, jnp.int32(len(prompt)), jnp.int32(max_new_tokens),
                     jnp.asarray(stop, jnp.int32),
                     jnp.float32(temperature), jnp.float32(top_p), jnp.int32(top_k), jnp.float32(tau), jnp.int32(seed),
                     attention=attention, max_new_tokens=_bucket(max_new_tokens, 1), block_size=block_size,
                     kv_storage=storage_dtype(kv_dtype, model_dtype=model.dtype))
  return [int(x) for x in out[: int(n)]]
