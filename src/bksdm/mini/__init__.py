"""The mini world: a procedural text-to-image world and a tiny SD-v1-shaped teacher, all offline on a CPU."""
