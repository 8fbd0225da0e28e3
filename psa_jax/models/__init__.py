"""The Llama-family decoder in Flax NNX and what it needs: checkpoints (GGUF, safetensors), tokenizer and chat
template, the paged KV as the model sees it, sharding, int8 weights, sampling and a simple `generate`."""

from psa_jax.models.checkpoint import DEFAULT_MODEL, LoadedModel, load
from psa_jax.models.config import ModelConfig, RopeScaling
from psa_jax.models.generate import generate
from psa_jax.models.kv_pages import PagedKV
from psa_jax.models.llama import Decoder
from psa_jax.models.parallel import MeshConfig
from psa_jax.models.quantize import quantize_int8
from psa_jax.models.tokenizer import Tokenizer

__all__ = ["DEFAULT_MODEL", "Decoder", "LoadedModel", "MeshConfig", "ModelConfig", "PagedKV", "RopeScaling",
           "Tokenizer", "generate", "load", "quantize_int8"]
