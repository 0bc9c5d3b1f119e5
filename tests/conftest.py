"""Shared fixtures: tiny seeded SD-v1-layout pipelines built in the test session (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

WORDS = "a small large red green blue circle square triangle at the top bottom left right and".split()
TINY_UNET = dict(channels=(8, 8, 16, 16), cross_attention_dim=16, groups=4, heads=2)


def pytest_collection_modifyitems(config, items):
    skip = {
        "slow": (os.environ.get("RUN_SLOW") != "1", "slow: set RUN_SLOW=1"),
        "gpu": (not torch.cuda.is_available(), "needs a CUDA device"),
        "real_weights": (os.environ.get("RUN_REAL_WEIGHTS") != "1", "needs real weights: set RUN_REAL_WEIGHTS=1"),
    }
    for item in items:
        for mark, (cond, why) in skip.items():
            if cond and mark in item.keywords:
                item.add_marker(pytest.mark.skip(reason=why))


def make_tiny_pipeline(seed: int = 0):
    from bksdm.mini.model import build_pipeline, unet_config

    return build_pipeline(WORDS, unet=unet_config(**TINY_UNET), text_width=16, seed=seed)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A saved tiny teacher pipeline with the SD-v1 block layout."""
    path = tmp_path_factory.mktemp("teacher")
    make_tiny_pipeline().save_pretrained(path)
    return path
