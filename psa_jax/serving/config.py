"""Engine and per-request configuration: frozen groups an entry point builds from its flags."""

from __future__ import annotations

import dataclasses
import re

from psa_jax.models.parallel import MeshConfig
from psa_jax.pallas_kernels import storage
from psa_jax.backend import KINDS
from psa_jax.config import IMPLS, PSAConfig, check_tau
from psa_jax.serving.request import SamplingParams  # re-exported: a request's settings
from psa_jax.serving.scheduler import SchedulerConfig


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


LAYER_WEIGHTS = ("auto", "stacked", "split")


@dataclasses.dataclass(frozen=True)
class AttentionDefaults:
  """What a request's decode attention is unless it picks its own.

  kind: "dense", "topk" or "psa". psa_tau: PSA's threshold (PSAConfig.tau's default, `check_tau`'s rule).
  topk_blocks: top-k's budget in blocks. dense_layers: the model's first layers attend densely whatever the kind.
  psa_dense_heads: (layer, KV head) pairs PSA reads densely (psa_jax/retrieval_heads.py).
  impl: "auto", "pallas", "xla" or "reference" (psa_jax/attention.py).
  """

  kind: str = "psa"
  psa_tau: float = PSAConfig.tau
  topk_blocks: int = 32
  dense_layers: int = 0
  psa_dense_heads: tuple[tuple[int, int], ...] = ()
  impl: str = "auto"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"attention must be one of {tuple(KINDS)}, got {self.kind!r}")
    check_tau(self.psa_tau, "psa_tau")
    if self.dense_layers < 0:
      raise ValueError(f"dense_layers must be >= 0, got {self.dense_layers}")
    if self.topk_blocks < 1:
      raise ValueError(f"topk_blocks must be >= 1, got {self.topk_blocks}")
    if self.impl not in IMPLS:
      raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
  """The KV arena. kv_memory: its size, "2GiB", "512MB", a byte count, or a share of device memory such as
  "0.5". block_size: tokens per page, a power of two in [16, 128]. kv_dtype: "model" (the weights' dtype),
  "float32" or "bfloat16" (half the arena and the bytes every decode step reads; on CPU stored packed,
  psa_jax/pallas_kernels/storage.py; the entry points default to it, like llama.cpp's f16 cache).
  max_context: longest prompt + output.
  """

  kv_memory: str = "0.25"
  block_size: int = 16
  kv_dtype: str = "model"
  max_context: int = 8192

  def __post_init__(self):
    if self.block_size & (self.block_size - 1) or not 16 <= self.block_size <= 128:
      raise ValueError(f"block_size must be a power of two in [16, 128], got {self.block_size}")
    if self.max_context < 1:
      raise ValueError(f"max_context must be >= 1, got {self.max_context}")
    parse_memory(self.kv_memory, total=1)  # validates the spelling
    if self.kv_dtype not in storage.KV_DTYPES:
      raise ValueError(f"kv_dtype must be one of {storage.KV_DTYPES}, got {self.kv_dtype!r}")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  """Where the model runs. mesh: "auto" (every local device, on the model axis as far as the head counts divide,
  the rest on the data axis), "none" (one device) or "data=2,model=4" (psa_jax/models/parallel.py).
  layer_weights: how decode reaches a layer's weights, an implementation choice the engine makes ("auto": split
  on CPU without a mesh). "stacked" slices the model's stacked arrays, which XLA:CPU copies out every step;
  "split" gives each layer arrays of its own (`Decoder.split_layers`), read in place at the cost of a second
  copy of the layer weights (one device only; 4-6 ms less per token at 1K, batch 1 on the 2-core VM).
  """

  mesh: str = "auto"
  layer_weights: str = "auto"

  def __post_init__(self):
    if self.layer_weights not in LAYER_WEIGHTS:
      raise ValueError(f"layer_weights must be one of {LAYER_WEIGHTS}, got {self.layer_weights!r}")
    if self.mesh not in ("auto", "none"):
      MeshConfig.parse(self.mesh)  # validates the spelling


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """An engine's configuration, one group per concern: the attention requests get by default, the KV cache, the
  scheduler (psa_jax/serving/scheduler.py) and the devices."""

  attention: AttentionDefaults = AttentionDefaults()
  cache: CacheConfig = CacheConfig()
  scheduler: SchedulerConfig = SchedulerConfig()
  parallel: ParallelConfig = ParallelConfig()

  def __post_init__(self):
    for name, kind in (("attention", AttentionDefaults), ("cache", CacheConfig), ("scheduler", SchedulerConfig),
                       ("parallel", ParallelConfig)):
      if not isinstance(getattr(self, name), kind):
        raise TypeError(f"EngineConfig.{name} must be a {kind.__name__}, got {getattr(self, name)!r}")
