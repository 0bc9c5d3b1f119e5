"""The mini world: a procedural text-to-image world and a tiny SD-v1-shaped teacher, all offline on a CPU.

Mini-world pipelines name a bksdm VAE class (``bksdm.mini.model.SpaceToDepthVAE``); diffusers loads it only once
that module is imported: ``import bksdm.mini.model`` before ``StableDiffusionPipeline.from_pretrained`` (bksdm's
own loaders do it for you). Importing this package alone loads no model code, so the CLI can read
``bksdm.mini.config`` without torch.
"""
