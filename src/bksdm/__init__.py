"""bksdm: block-removed, knowledge-distilled Stable Diffusion (BK-SDM), from compression to evaluation.

The library is importable piece by piece (``bksdm.arch``, ``bksdm.distill``, ``bksdm.evaluate``, ``bksdm.profile``,
``bksdm.mini``, ``bksdm.dreambooth``); the recipes live in ``bksdm.recipes`` and the CLI in ``bksdm.cli``.
"""

__version__ = "0.1.0"
