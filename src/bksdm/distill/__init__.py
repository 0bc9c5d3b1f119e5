"""Distillation library: config, data sources, feature hooks and the KD loss, latent/text caching."""
