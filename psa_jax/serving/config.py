"""Engine and per-request configuration."""

from __future__ import annotations

import dataclasses
import re

from psa_jax.models.parallel import MeshConfig
from psa_jax.pallas_kernels import storage
from psa_jax.backend import KINDS
from psa_jax.config import PSAConfig, check_tau
from psa_jax.serving.request import SamplingParams  # re-exported: a request's settings
from psa_jax.serving.scheduler import SchedulerConfig


LAYER_WEIGHTS = ("auto", "stacked", "split")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """attention: default backend kind ("dense", "topk", "psa"); psa_tau, topk_blocks: their defaults;
  dense_layers: the model's first layers attend densely whatever the kind.
  kv_memory: the arena's size, "2GiB", "512MB", a byte count, or a share of device memory such as "0.5".
  max_context: longest prompt + output.
  max_batch, max_num_batched_tokens, prefill_chunk, decode_window, max_window_seconds, scheduler_policy: the
    scheduler's (SchedulerConfig, psa_jax/serving/scheduler.py): requests admitted at once, prefill tokens per
    step, most tokens of one prompt per step, most decode steps between host reads and the wall time a window
    aims to stay under, and "budget" or "serial".
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
  max_num_batched_tokens: int = 2048
  max_window_seconds: float = 0.25
  scheduler_policy: str = "budget"
  impl: str = "auto"
  mesh: str = "auto"
  kv_dtype: str = "model"
  layer_weights: str = "auto"

  def __post_init__(self):
    if self.attention not in KINDS:
      raise ValueError(f"attention must be one of {tuple(KINDS)}, got {self.attention!r}")
    check_tau(self.psa_tau, "psa_tau")
    if self.dense_layers < 0:
      raise ValueError(f"dense_layers must be >= 0, got {self.dense_layers}")
    self.scheduler_config()  # validates the scheduler's fields
    for name in ("topk_blocks", "block_size", "max_context"):
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


  def scheduler_config(self) -> SchedulerConfig:
    return SchedulerConfig(max_batch=self.max_batch, max_num_batched_tokens=self.max_num_batched_tokens,
                           prefill_chunk=self.prefill_chunk, decode_window=self.decode_window,
                           max_window_seconds=self.max_window_seconds, policy=self.scheduler_policy)


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
