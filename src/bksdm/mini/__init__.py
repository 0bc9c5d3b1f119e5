"""The mini world: a procedural text-to-image world and a tiny SD-v1-shaped teacher, all offline on a CPU."""

from bksdm.mini import model  # noqa: F401  (registers SpaceToDepthVAE so diffusers pipelines can load it)
