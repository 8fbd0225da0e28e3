"""Engine and per-request configuration."""

from __future__ import annotations

import dataclasses
import re

from psa_jax.models.parallel import MeshConfig
from psa_jax.pallas_kernels import storage
from psa_jax.backend import KINDS
from psa_jax.config import PSAConfig


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Per-request generation settings. temperature 0 is greedy."""

  max_tokens: int = 64
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0
  stop_token_ids: tuple[int, ...] | None = None  # None: the model's eos tokens

  def __post_init__(self):
    if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
      raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
    if not 0.0 <= self.temperature <= 2.0:
      raise ValueError(f"temperature must be in [0, 2], got {self.temperature!r}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
    if not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
      raise ValueError(f"seed must be an integer in [0, 2**31), got {self.seed!r}")


LAYER_WEIGHTS = ("auto", "stacked", "split")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """attention: default backend kind ("dense", "topk", "psa"); psa_tau, topk_blocks: their defaults;
  dense_layers: the model's first layers attend densely whatever the kind.
  kv_memory: the arena's size, "2GiB", "512MB", a byte count, or a share of device memory such as "0.5".
  max_batch: sequences decoding together. max_context: longest prompt + output.
  decode_window: decode steps run on device between host reads.
  prefill_chunk: prompt tokens prefilled per engine step, so a long prompt does not stall running decodes.
  mesh: how to spread the model over devices (psa_jax/models/parallel.py): "auto" (every local device, on the model
    axis as far as the head counts divide, the rest on the data axis), "none" (one device), or "data=2,model=4".
  kv_dtype: the KV cache's dtype: "model" (the model's), "float32" or "bfloat16". bfloat16 halves the arena and
    the bytes every decode step reads (on CPU it is stored packed, psa_jax/pallas_kernels/storage.py); the entry points
    (serve, bench) default to it, like llama.cpp's f16 cache.
  layer_weights: how decode reaches a layer's weights: "stacked" (slices of the model's stacked arrays, which
    XLA:CPU copies out every step), "split" (arrays of their own, `Decoder.split_layers`: read in place, at the
    cost of a second copy of the layer weights in memory; one device only), or "auto" (split on CPU without a
    mesh). Measured: 4-6 ms less per token at 1K, batch 1 on the 2-core development VM.
  """

  attention: str = "psa"
  psa_tau: float = PSAConfig.tau
  topk_blocks: int = 32
  dense_layers: int = 0
  block_size: int = 16
  kv_memory: str = "0.25"
  max_batch: int = 8
  max_context: int = 8192
  decode_window: int = 16
  prefill_chunk: int = 512
  impl: str = "auto"
  mesh: str = "auto"
  kv_dtype: str = "model"
  layer_weights: str = "auto"

  def __post_init__(self):
    if self.attention not in KINDS:
      raise ValueError(f"attention must be one of {tuple(KINDS)}, got {self.attention!r}")
    if not 0.0 < self.psa_tau <= 1.0:
      raise ValueError(f"psa_tau must be in (0, 1], got {self.psa_tau}")
    if self.dense_layers < 0:
      raise ValueError(f"dense_layers must be >= 0, got {self.dense_layers}")
    for name in ("topk_blocks", "block_size", "max_batch", "max_context", "decode_window", "prefill_chunk"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.block_size & (self.block_size - 1) or not 16 <= self.block_size <= 128:
      raise ValueError(f"block_size must be a power of two in [16, 128], got {self.block_size}")
    parse_memory(self.kv_memory, total=1)  # validates the spelling
    if self.kv_dtype not in storage.KV_DTYPES:
      raise ValueError(f"kv_dtype must be one of {storage.KV_DTYPES}, got {self.kv_dtype!r}")
    if self.layer_weights not in LAYER_WEIGHTS:
      raise ValueError(f"layer_weights must be one of {LAYER_WEIGHTS}, got {self.layer_weights!r}")
    if self.mesh not in ("auto", "none"):
      MeshConfig.parse(self.mesh)  # validates the spelling


_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_memory(spec: str | int, *, total: int) -> int:
  """Bytes from "2GiB" / "512MB" / "123456" / a share of `total` such as "0.5"."""
  text = str(spec).strip().upper()
  match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([KMG]I?B|B)?", text)
  if not match:
    raise ValueError(f"kv_memory {spec!r}: expected bytes ('2GiB', '512MB', '1000000') or a share like '0.5'")
  value, unit = float(match.group(1)), match.group(2) or ""
  if not unit and value <= 1.0 and "." in text:
    if value <= 0:
      raise ValueError(f"kv_memory share must be in (0, 1], got {spec!r}")
    return int(value * total)
  return int(value * _UNITS[unit])
