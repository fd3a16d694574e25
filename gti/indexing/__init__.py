"""Semantic IDs: embed item text, quantise (residual k-means or RQ-VAE), make collision-free, guard finished indexes."""
