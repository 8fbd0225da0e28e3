"""psa_jax: Progressive Sparse Attention for long-context LLM serving, in JAX and Pallas."""

from psa_jax.pallas_kernels.summaries import BlockSummaries, summarize_pages, update_summaries
from psa_jax.attention import dense_attention, psa_attention, topk_attention
from psa_jax.backend import AttentionBackend
from psa_jax.config import DenseConfig, PSAConfig, TopKConfig

__all__ = [
    "AttentionBackend",
    "BlockSummaries",
    "DenseConfig",
    "PSAConfig",
    "TopKConfig",
    "dense_attention",
    "psa_attention",
    "summarize_pages",
    "topk_attention",
    "update_summaries",
]
