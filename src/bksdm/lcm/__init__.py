"""Latent consistency distillation: config and the consistency maths (solver, boundary scalings, guidance embedding)."""
