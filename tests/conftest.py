"""Shared fixtures: tiny seeded SD-v1-layout pipelines built in the test session (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BKSDM_THREADS", "1")  # main() in-process: one thread, no start-up load measurement
torch.set_num_threads(1)

WORDS = "a small large red green blue circle square triangle at the top bottom left right and".split()
TINY_UNET = dict(channels=(8, 8, 16, 16), cross_attention_dim=16, groups=4, heads=2)


def pytest_collection_modifyitems(config, items):
    skip = {
        "slow": (os.environ.get("RUN_SLOW") != "1", "slow: set RUN_SLOW=1"),
        "gpu": (not torch.cuda.is_available(), "needs a CUDA device"),
        "real_weights": (os.environ.get("RUN_REAL_WEIGHTS") != "1", "needs real weights: set RUN_REAL_WEIGHTS=1"),
        "real_clients": (os.environ.get("RUN_REAL_CLIENTS") != "1",
                         "real runtimes (stable-diffusion.cpp, built on install): set RUN_REAL_CLIENTS=1"),
        "reference_env": (os.environ.get("RUN_REFERENCE_ENV") != "1",
                          "reference packages in their own environment (tests/reference_env): set RUN_REFERENCE_ENV=1"),
    }
    for item in items:
        for mark, (cond, why) in skip.items():
            if cond and mark in item.keywords:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(autouse=True)
def _fresh_notes():
    """Each test sees every note it causes (bksdm prints a note once per process)."""
    from bksdm.errors import reset_notes

    reset_notes()


def one_line_error(capsys) -> str:
    """The CLI's stderr, checked to be one line without a traceback (how every user error must look)."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def make_tiny_pipeline(seed: int = 0):
    from bksdm.mini.model import build_pipeline, unet_config

    return build_pipeline(WORDS, unet=unet_config(**TINY_UNET), text_width=16, seed=seed)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A saved tiny teacher pipeline with the SD-v1 block layout."""
    path = tmp_path_factory.mktemp("teacher")
    make_tiny_pipeline().save_pretrained(path)
    return path


def make_tiny_sdxl_pipeline(seed: int = 0):
    """An SDXL-layout pipeline with random weights: two text encoders (the second with a pooled projection),
    transformer depth 1/2/3, text_time conditioning, a tiny AutoencoderKL."""
    from bksdm.mini.model import build_sdxl_pipeline

    return build_sdxl_pipeline(WORDS, seed=seed)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl_teacher")
    make_tiny_sdxl_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def flat_metric_home(tmp_path_factory):
    """A TORCH_HOME with fresh random Inception weights: near-constant features, so FID of a dozen images stays
    well-conditioned (for FID's ordering checks; no IS check can fail on it)."""
    from bksdm.evaluate.weights import FID_INCEPTION, random_inception

    home = tmp_path_factory.mktemp("flat_torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(random_inception(0, calibrate=False).state_dict(), home / "hub" / "checkpoints" / FID_INCEPTION)
    return home


@pytest.fixture(scope="session")
def metric_home(tmp_path_factory):
    """A TORCH_HOME holding random-weight Inception files of the real architectures (pytorch-fid's FID Inception;
    torch-fidelity's Inception reads the same keys) whose features differ between images, and a tiny open_clip
    config with a random checkpoint."""
    import open_clip

    from bksdm.evaluate.weights import FID_INCEPTION, ISC_INCEPTION, random_inception

    home = tmp_path_factory.mktemp("torch_home")
    m = random_inception(0)
    ck = home / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    torch.save(m.state_dict(), ck / FID_INCEPTION)
    torch.save(m.state_dict(), ck / ISC_INCEPTION)
    cfg = home / "bksdm-tiny-clip.json"
    cfg.write_text('{"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},'
                   ' "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}')
    open_clip.add_model_config(cfg)
    clip = open_clip.create_model("bksdm-tiny-clip")
    torch.save(clip.state_dict(), home / "tiny-clip.pt")
    return home


# Flags and config of a few-second distillation of the tiny teacher (shared by the distill and fault tests).
FAST = ["--resolution", "32", "--batch-size", "4", "--mixed-precision", "no", "--num-workers", "0",
        "random_flip=false", "report_to=none", "gradient_checkpointing=false"]


def distill_cfg(teacher, out, **kw):
    """A tiny DistillConfig for the tiny teacher (mini-world data at 32 px, fp32, no workers), ``kw`` on top."""
    from bksdm.distill.config import DistillConfig

    base = dict(teacher=str(teacher), student="bk-small", data="mini-world:16", out=str(out), resolution=32,
                batch_size=4, grad_accum=1, max_steps=4, mixed_precision="no", num_workers=0, random_flip=False,
                report_to="none", gradient_checkpointing=False, checkpoint_every=100)
    return DistillConfig().update(base | kw, "test")


def hf_image_dataset(tmp_path, n: int = 8, broken: int | None = None):
    """A tiny `datasets` dataset of world pictures (one row's image bytes corrupt), saved to disk and as parquet."""
    import datasets
    from PIL import Image as PILImage

    from bksdm.mini.world import ShapesWorld

    rows = {"picture": [], "caption": []}
    for i in range(n):
        image, text, _ = ShapesWorld().sample(i)
        rows["picture"].append(image)
        rows["caption"].append(text)
    ds = datasets.Dataset.from_dict(rows).cast_column("picture", datasets.Image())
    if broken is not None:
        ds = ds.cast_column("picture", datasets.Image(decode=False))
        ds = ds.map(lambda r, i: {"picture": {"bytes": b"junk", "path": None}} if i == broken else r, with_indices=True)
        ds = ds.cast_column("picture", datasets.Image())
    ds.save_to_disk(str(tmp_path / "disk"))
    ds.to_parquet(str(tmp_path / "data.parquet"))
    assert isinstance(ds[0 if broken != 0 else 1]["picture"], PILImage.Image)
    return tmp_path / "disk", tmp_path / "data.parquet"


def write_prompt_csv(path, rows):
    """An MS-COCO-style prompt csv (``file_name``, ``caption``) of ``rows``; returns ``path``."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption"])
        w.writerows(rows)
    return path


def assert_cached_equals_live(plain, cached, micro_batches_n: int = 2) -> None:
    """A recipe reading a `bksdm cache` computes the same loss terms as one encoding the same pictures live (same
    positions, flips, caption drops and noise), and loads no VAE or text encoder."""
    import torch

    from bksdm.distill.loader import micro_batches

    assert not hasattr(cached, "vae") and not hasattr(cached, "text_parts")
    for micro in range(micro_batches_n):
        b1 = next(micro_batches(plain.source, 1234, True, 32, 4, 0, 1, micro))
        b2 = next(micro_batches(cached.source, 1234, True, 32, 4, 0, 1, micro))
        l1 = plain.loss_step(b1, torch.Generator().manual_seed(micro))
        l2 = cached.loss_step(b2, torch.Generator().manual_seed(micro))
        for k in l1:
            torch.testing.assert_close(l1[k], l2[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.fixture
def subject_dir(tmp_path):
    """A three-image DreamBooth subject: a large red triangle, slightly moved."""
    from bksdm.mini.world import Shape, render

    folder = tmp_path / "subject"
    folder.mkdir()
    for i, jit in enumerate([(0, 0), (1, -1), (-1, 1)]):
        render((Shape("triangle", "red", "large", "top left"),), 32, (jit,)).save(folder / f"{i}.png")
    return folder
