"""Sharding the decoder and its paged KV over a `jax.sharding.Mesh` with axes ("data", "model").

  model: tensor parallel, Megatron style. Q/K/V and the MLP's gate/up are split by output columns (whole KV-head
    groups: query head j sits with KV head j // group), the attention output and MLP down projections by input
    rows, so each layer needs one all-reduce after attention and one after the MLP, inserted by XLA's SPMD
    partitioner. The KV arena and its block summaries are split by KV head: every device writes, scores and
    attends only its own heads, under `shard_map`, so PSA's data-dependent loop runs per device with no traffic.
  data: decode batch rows are split across replicas. Every data replica holds the pages of all sequences (for
    its KV heads): the few new K/V rows of a step are all-gathered and written everywhere, the arena never is.
    That keeps one page allocator for the whole engine; the price is that the page pool is not divided by the
    data axis (memory per device = the pool's bytes / model).

Embeddings, norms and the LM head stay replicated. With one device none of this is used.
`shard_map` runs with check_vma=False: the attention kernels' loops start from constants that JAX's
replication typing would otherwise make us cast by hand; the specs below are what each value really is.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from psa_jax.models.config import ModelConfig
from psa_jax.models.kv_pages import PagedKV
from psa_jax.pallas_kernels.summaries import BlockSummaries

DATA, MODEL = "data", "model"

# Column-split weights [L, in, out] (and their [L, out] biases, [L, 1, out] int8 scales); row-split [L, in, out].
_COLUMN = ("wq", "wk", "wv", "w_gate", "w_up")
_BIAS = ("bq", "bk", "bv", "b_gate", "b_up")
_ROW = ("wo", "w_down")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Devices along each mesh axis; data * model devices are used."""

  data: int = 1
  model: int = 1

  def __post_init__(self):
    for name in ("data", "model"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"mesh axis {name} must be a positive integer, got {value!r}")

  @property
  def size(self) -> int:
    return self.data * self.model

  @classmethod
  def parse(cls, spec: str) -> "MeshConfig":
    """From "data=2,model=4" (either axis may be left out, it is then 1)."""
    fields = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
      match = re.fullmatch(r"(data|model)\s*=\s*(\d+)", part)
      if not match or match.group(1) in fields:
        raise ValueError(f"mesh {spec!r}: expected 'data=N,model=M', e.g. 'data=2,model=4'")
      fields[match.group(1)] = int(match.group(2))
    return cls(**fields)

  @classmethod
  def default(cls, num_devices: int, config: ModelConfig) -> "MeshConfig":
    """All devices on the model axis when the head counts divide; otherwise the largest model axis that does,
    and the rest on the data axis."""
    model = max(m for m in range(1, num_devices + 1) if num_devices % m == 0 and _divides(m, config))
    return cls(data=num_devices // model, model=model)

  def check(self, config: ModelConfig, num_devices: int) -> None:
    if self.size > num_devices:
      raise ValueError(f"mesh data={self.data},model={self.model} needs {self.size} devices, {num_devices} found")
    if not _divides(self.model, config):
      raise ValueError(
          f"model axis {self.model} must divide the KV heads ({config.num_kv_heads}), query heads "
          f"({config.num_heads}) and MLP width ({config.intermediate_size})")


def _divides(m: int, config: ModelConfig) -> bool:
  return all(n % m == 0 for n in (config.num_kv_heads, config.num_heads, config.intermediate_size))


def make_mesh(mesh_config: MeshConfig, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)[: mesh_config.size]
  if len(devices) < mesh_config.size:
    raise ValueError(f"mesh needs {mesh_config.size} devices, {len(devices)} given")
  return Mesh(np.asarray(devices).reshape(mesh_config.data, mesh_config.model), (DATA, MODEL))


def param_spec(name: str, ndim: int) -> P:
  """The partition spec of a decoder parameter, by attribute name."""
  base = name.removesuffix("_scale")
  if base in _COLUMN or base in _BIAS:
    return P(*([None] * (ndim - 1)), MODEL)
  if base in _ROW and not name.endswith("_scale"):
    return P(None, MODEL, None)
  return P()


def shard_model(model, mesh: Mesh):
  """Places the decoder's parameters on `mesh` (in place) and returns the model."""
  from flax import nnx

  for name, variable in vars(model).items():
    if isinstance(variable, nnx.Variable):
      value = variable.get_value()
      variable.set_value(jax.device_put(value, NamedSharding(mesh, param_spec(name, value.ndim))))
  return model


KV_SPEC = PagedKV(P(MODEL), P(MODEL), BlockSummaries(*(P(MODEL) for _ in BlockSummaries._fields)))


def kv_sharding(mesh: Mesh) -> PagedKV:
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), KV_SPEC, is_leaf=lambda x: isinstance(x, P))


def shard_kv(kv: PagedKV, mesh: Mesh) -> PagedKV:
  return jax.device_put(kv, kv_sharding(mesh))


def data_size(mesh: Mesh | None) -> int:
  return 1 if mesh is None else mesh.shape[DATA]


def decode_attention(run, mesh: Mesh | None):
  """Wraps a decode step's attention (`llama.decode_attention_step`, its backend bound):
  `run(gather_rows, kv, q, k, v, table, positions, writes, tau, layer) -> (kv, out, used)`, so that,
  on a mesh, each device runs it on its own KV heads and batch rows. Shapes (global): q [B, Hq, D]; k, v [B, H, D];
  table [B, M]; positions, writes [B]; tau [B, H]; layer [] (the layer index); out [B, Hq, D]; used [B, H].

  `run` receives `gather_rows`: applied to per-row arrays, it returns the rows of the whole batch (an all-gather
  over the data axis), which is what the KV write needs since every data replica holds every sequence's pages.
  """
  if mesh is None:
    return lambda *args: run(lambda rows: rows, *args)
  rows, heads = P(DATA), P(DATA, MODEL)

  def gather_rows(tree):
    if mesh.shape[DATA] == 1:
      return tree
    return jax.tree.map(lambda x: jax.lax.all_gather(x, DATA, axis=0, tiled=True), tree)

  return jax.shard_map(
      lambda *args: run(gather_rows, *args), mesh=mesh,
      in_specs=(KV_SPEC, heads, heads, heads, rows, rows, rows, heads, P()),
      out_specs=(KV_SPEC, heads, heads), check_vma=False)


def prefill_attention(run, mesh: Mesh | None):
  """Wraps a prefill span's attention (`llama.prefill_attention_step`, its query chunk bound):
  `run(kv, q, k, v, table, start, num) -> (kv, out)`, so that, on a mesh, each device
  handles its own KV heads (the span is replicated over the data axis). q [B, T, Hq, D]; k, v [B, T, H, D];
  table [B, M]; start, num [B]; out [B, T, Hq, D]."""
  if mesh is None:
    return run
  heads = P(None, None, MODEL)
  return jax.shard_map(run, mesh=mesh, in_specs=(KV_SPEC, heads, heads, heads, P(), P(), P()),
                       out_specs=(KV_SPEC, heads), check_vma=False)


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int) -> None:
  """Joins a multi-host run (one process per host, each seeing its local devices); afterwards
  `jax.devices()` lists every host's devices and meshes span them. Every process must then run the same
  program: the same engine calls in the same order (a fixed workload such as `psa_jax.bench`)."""
  if num_processes is None or process_id is None:
    raise ValueError("multi-host runs need coordinator_address, num_processes and process_id")
  jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)


def describe(mesh: Mesh | None) -> str:
  if mesh is None:
    return "1 device"
  return f"{math.prod(mesh.devices.shape)} devices (data={mesh.shape[DATA]}, model={mesh.shape[MODEL]})"
