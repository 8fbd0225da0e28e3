"""The attention kernels (Pallas and the XLA path) and their plain-jnp references.

Users call them through `psa_jax.dense_attention` / `topk_attention` / `psa_attention`; these are the pieces:
block summaries, scoring, the visit plan, the stopping rule, the progressive loop and the oracles.
"""

from psa_jax.pallas_kernels.summaries import BlockSummaries, summarize_pages, update_summaries

__all__ = ["BlockSummaries", "summarize_pages", "update_summaries"]
