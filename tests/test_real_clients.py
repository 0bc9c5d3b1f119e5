"""Opt-in tier (``RUN_REAL_CLIENTS=1``): the runtimes our users ship to read what `bksdm export` writes.

stable-diffusion.cpp (its Python bindings, ``stable-diffusion-cpp-python``, which build the library from source on
install: about 15 minutes on 2 cores) loads the ``--layout sd-cpp`` file of a full-size bk-tiny (random weights of
the SD-v1.4 architecture: sd.cpp builds its U-Net from hard-coded sizes, so a tiny test model cannot stand in) and
draws the image diffusers draws from the same weights, noise and sampler: 4 Euler steps over SD's discrete
schedule, the empty prompt without guidance (no tokenizer needed offline), torch's CPU random numbers on both sides.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from bksdm.cli import main

pytestmark = pytest.mark.real_clients
SD_CPP = "stable-diffusion-cpp-python==0.4.7"  # the version the checks used


def _sd_cpp():
    try:
        return importlib.import_module("stable_diffusion_cpp")
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", SD_CPP], check=True)
        return importlib.import_module("stable_diffusion_cpp")


@pytest.fixture(scope="module")
def full_size_bk_tiny(tmp_path_factory):
    """An SD-v1.4-shaped teacher with random weights (no tokenizer: prompts enter as embeddings) and its bk-tiny."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from bksdm.arch.families import FAMILIES
    from bksdm.profile import random_components

    root = tmp_path_factory.mktemp("sdcpp")
    fam = FAMILIES["sd-v1"]
    parts = random_components("sd-v1", fam["unet"], fam["text_encoder"], fam["vae"])
    with torch.no_grad():  # random weights of this scale saturate; smaller ones keep the image in range
        for p in parts.unet.parameters():
            p.mul_(0.5)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="linspace", steps_offset=1)
    StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=None, unet=parts.unet,
                            scheduler=sched, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(root / "teacher")
    assert main(["compress", "--teacher", str(root / "teacher"), "--student", "bk-tiny", "--out", str(root / "tiny")]) == 0
    return root


def _diffusers_image(folder, seed: int, steps: int) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, tokenizer=None, feature_extractor=None)
    ids = torch.tensor([[49406] + [49407] * 76])  # "" as CLIP tokenises it for SD-v1: BOS, then EOS as padding
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
    noise = torch.randn((1, 4, 64, 64), generator=torch.Generator().manual_seed(seed))
    pipe.scheduler.set_timesteps(steps)
    sigma_max = float(pipe.scheduler.sigmas[0])
    # k-diffusion (sd.cpp) starts from noise * sigma_max; diffusers' Euler multiplies by sqrt(sigma_max^2 + 1)
    latents = noise * sigma_max / float(pipe.scheduler.init_noise_sigma)
    out = pipe(prompt_embeds=emb, guidance_scale=1.0, num_inference_steps=steps, latents=latents, output_type="np")
    return np.round(out.images[0] * 255)


def test_stable_diffusion_cpp_reads_the_sd_cpp_file_of_bk_tiny(full_size_bk_tiny, tmp_path, capfd):
    sd_cpp = _sd_cpp()
    file = tmp_path / "bk-tiny-sdcpp.safetensors"
    assert main(["export", str(full_size_bk_tiny / "tiny"), "--out", str(file), "--layout", "sd-cpp", "--dtype",
                 "fp32"]) == 0
    model = sd_cpp.StableDiffusion(model_path=str(file), rng_type="cpu", sampler_rng_type="cpu", n_threads=2,
                                   verbose=True)
    log = capfd.readouterr()
    text = log.out + log.err
    assert "SD1.x Tiny UNet" in text or "Tiny" in text, text[-2000:]
    images = model.generate_image(prompt="", cfg_scale=1.0, sample_method="euler", scheduler="discrete",
                                  sample_steps=4, seed=7, width=512, height=512)
    ours = np.asarray(images[0].convert("RGB"), dtype=np.float64)
    ref = _diffusers_image(full_size_bk_tiny / "tiny", 7, 4)
    diff = np.abs(ours - ref)
    record = {"file": "bk-tiny, --layout sd-cpp", "runtime": f"stable-diffusion.cpp ({SD_CPP})", "loaded": True,
              "max_level_difference": float(diff.max()), "mean_level_difference": float(diff.mean())}
    print(json.dumps(record))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 2, record
