"""`bksdm dreambooth` on SD3 and Flux pipelines (tiny random ones): LoRA on the transformer with prior preservation,
the loss equal to diffusers' train_dreambooth_lora_sd3.py / train_dreambooth_lora_flux.py on the same draws, the
saved LoRA read by the pipelines' own load_lora_weights, full fine-tuning, and one-line refusals."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from bksdm.cli import main
from tests.conftest import one_line_error
from tests.test_flow import tiny_flux, tiny_sd3

PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


@pytest.fixture(scope="module")
def flow_teachers(tmp_path_factory):
    """SD3 without T5 (the no-T5 layout: 77 CLIP tokens + T5 zeros) and Flux-dev (guidance embedding) folders."""
    root = tmp_path_factory.mktemp("db_flow")
    tiny_sd3(t5=False).save_pretrained(root / "sd3")
    tiny_flux(guidance=True).save_pretrained(root / "flux")
    return {"sd3": root / "sd3", "flux": root / "flux"}




def _ft(teacher, subject, out, *extra):
    return main(["dreambooth", "--model", str(teacher), "--instance-dir", str(subject), "--instance-prompt",
                 "a red triangle", "--class-prompt", "a triangle", "--num-class-images", "2", "--class-steps", "2",
                 "--resolution", "32", "--max-steps", "2", "--out", str(out), "--no-gradient-checkpointing", *extra,
                 "--mixed-precision", "no"])


def _pipe(kind, folder):
    import diffusers

    absent = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3" else {}
    pipe = getattr(diffusers, PIPELINES[kind]).from_pretrained(folder, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe):
    out = pipe("a red triangle", num_inference_steps=2, height=32, width=32, output_type="pt", max_sequence_length=8,
               generator=torch.Generator().manual_seed(0))
    return out.images


@pytest.mark.parametrize("kind,prior", [("sd3", True), ("flux", False)])
def test_lora_trains_and_loads_through_the_pipelines_own_loader(kind, prior, flow_teachers, subject_dir, tmp_path):
    """`--config sd3|flux` (the scripts' defaults): every term finite and named as for U-Nets; the file holds the
    scripts' target modules under ``transformer.`` at rank 4; ``load_lora_weights`` of the family's pipeline reads
    it, its images differ from the base pipeline's and equal those of the base with W + B A fused by hand."""
    from safetensors.torch import load_file

    from bksdm.dreambooth.config import LORA_PRESETS

    out = tmp_path / kind
    assert _ft(flow_teachers[kind], subject_dir, out, "--config", kind, *([] if prior else ["--no-with-prior"])) == 0
    rec = json.loads((out / "finetune.json").read_text())
    assert set(rec["final"]) == ({"loss", "instance", "prior"} if prior else {"loss", "instance"})
    assert all(math.isfinite(v) for v in rec["final"].values()) and rec["steps"] == 2
    if prior:
        assert rec["final"]["loss"] == pytest.approx(rec["final"]["instance"] + rec["final"]["prior"], rel=1e-4)
        assert rec["class_images"] == 2 and len(list((out / "class_images").glob("*.png"))) == 2
    file = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert file and all(k.startswith("transformer.") for k in file)  # the transformer only: text encoders frozen
    targets = {re.fullmatch(r"transformer\.\w*transformer_blocks\.\d+\.(.+)\.lora_A\.weight", k).group(1)
               for k in file if ".lora_A." in k}
    assert targets == set(LORA_PRESETS["diffusers"][kind]["target_modules"])
    assert {v.shape[0] for k, v in file.items() if ".lora_A." in k} == {4}

    base = _pipe(kind, flow_teachers[kind])
    want_base = _image(base)
    truth = {k: v.clone() for k, v in base.transformer.state_dict().items()}
    for down, a in ((k, v) for k, v in file.items() if ".lora_A." in k):  # alpha = rank: W + B A
        key = down.removeprefix("transformer.").replace(".lora_A.weight", ".weight")
        truth[key] = truth[key] + file[down.replace("lora_A", "lora_B")] @ a
    loaded = _pipe(kind, flow_teachers[kind])
    loaded.load_lora_weights(out / "final")
    assert any("lora" in n for n, _ in loaded.transformer.named_parameters())
    got = _image(loaded)
    assert not torch.allclose(got, want_base, atol=1e-4)
    fused = _pipe(kind, flow_teachers[kind])
    fused.transformer.load_state_dict(truth)
    torch.testing.assert_close(got, _image(fused), rtol=0, atol=1e-5)

    from bksdm.recipes.dreambooth import personalised_pipeline  # the benchmark's path: base + its LoRA

    pipe = personalised_pipeline(str(flow_teachers[kind]), out, lora=True)
    torch.testing.assert_close(_image(pipe), got, rtol=0, atol=1e-6)


def _script_loss(kind, run, pixels, texts, seed):
    """The loss of diffusers' examples/dreambooth/train_dreambooth_lora_{sd3,flux}.py (commit 58eb52c, the training
    loop of `main`) on run's networks, with its random draws taken from ``Generator(seed)`` in the recipe's order (VAE
    posterior, noise, u): steps written out as the script has them; the pipeline's encode_prompt stands for the
    script's copy of it (tests/test_flow.py checks the families' encoding against the pipelines')."""
    import diffusers
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    from bksdm.models import encode_pixels

    gen = torch.Generator().manual_seed(seed)
    vae, transformer = run.vae, run.denoiser
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(run.folder, subfolder="scheduler")
    absent = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3" else {}
    pipe = getattr(diffusers, PIPELINES[kind])(scheduler=scheduler, vae=vae, transformer=transformer,
                                               **run.text_parts, **absent)
    weighting_scheme = "logit_normal" if kind == "sd3" else "none"  # each script's --weighting_scheme default
    with torch.no_grad():
        dist = encode_pixels(vae, pixels)
        model_input = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)  # latent_dist.sample()
        model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
        if kind == "sd3":  # --max_sequence_length 77
            prompt_embeds, _, pooled_prompt_embeds, _ = pipe.encode_prompt(
                texts, None, None, do_classifier_free_guidance=False, max_sequence_length=77)
        else:  # 512
            prompt_embeds, pooled_prompt_embeds, text_ids = pipe.encode_prompt(texts, None, max_sequence_length=512)
    noise = torch.randn(model_input.shape, generator=gen)  # torch.randn_like(model_input)
    bsz = model_input.shape[0]
    u = compute_density_for_timestep_sampling(weighting_scheme=weighting_scheme, batch_size=bsz, logit_mean=0.0,
                                              logit_std=1.0, mode_scale=1.29, generator=gen)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]  # get_sigmas
    sigmas = scheduler.sigmas[step_indices].flatten()[:, None, None, None]
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    if kind == "sd3":
        model_pred = transformer(hidden_states=noisy_model_input, timestep=timesteps,
                                 encoder_hidden_states=prompt_embeds, pooled_projections=pooled_prompt_embeds,
                                 return_dict=False)[0]
        model_pred = model_pred * (-sigmas) + noisy_model_input  # --precondition_outputs 1
        target = model_input
    else:
        c, h, w = model_input.shape[1:]
        latent_image_ids = diffusers.FluxPipeline._prepare_latent_image_ids(bsz, h // 2, w // 2, "cpu", torch.float32)
        packed = diffusers.FluxPipeline._pack_latents(noisy_model_input, bsz, c, h, w)
        guidance = torch.tensor([3.5]).expand(bsz)  # --guidance_scale 3.5 (guidance_embeds)
        model_pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                 pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds,
                                 txt_ids=text_ids, img_ids=latent_image_ids, return_dict=False)[0]
        vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        model_pred = diffusers.FluxPipeline._unpack_latents(
            model_pred, height=h * vae_scale_factor, width=w * vae_scale_factor, vae_scale_factor=vae_scale_factor)
        target = noise - model_input
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
    target, target_prior = torch.chunk(target, 2, dim=0)
    weighting, weighting_prior = torch.chunk(weighting, 2, dim=0)
    prior_loss = torch.mean((weighting_prior.float() * (model_pred_prior.float() - target_prior.float()) ** 2).reshape(
        target_prior.shape[0], -1), 1).mean()
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
    loss = loss.mean()
    return {"instance": loss, "prior": prior_loss, "loss": loss + 1.0 * prior_loss}


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_loss_is_the_diffusers_scripts_on_the_same_draws(kind, flow_teachers, subject_dir, tmp_path):
    """With prior preservation at batch 2 (4 rows): instance, prior and total equal the script's formula on the same
    latents, noise and sigmas, to float rounding: F.mse_loss (bksdm.training.task_loss) sums in another order than
    the script's mean of row means (Flux's prior term here: one ulp), and SD3's x0 = x_t - sigma pred takes sigma as
    t / 1000, one ulp off the table's sigma for 26 of its 1000 entries (on this draw SD3's terms are bit-equal)."""
    import random

    from bksdm.dreambooth.config import DreamBoothConfig, load_dreambooth_config
    from bksdm.recipes.dreambooth import DreamBooth, epoch_order

    cfg = load_dreambooth_config(kind, None, model=str(flow_teachers[kind]), instance_dir=str(subject_dir),
                                 instance_prompt="a red triangle", class_prompt="a triangle", num_class_images=2,
                                 class_steps=2, resolution=32, batch_size=2, out=str(tmp_path / "o"),
                                 mixed_precision="no", gradient_checkpointing=False)
    assert isinstance(cfg, DreamBoothConfig)
    run = DreamBooth(cfg).setup()
    rng = random.Random(0)
    pixels, texts = run._batch(epoch_order(len(run.instances), len(run.classes), rng), rng)
    with torch.no_grad():
        got = run.loss_step(pixels, texts, torch.Generator().manual_seed(7))
        want = _script_loss(kind, run, pixels, texts, 7)
    assert set(got) == {"loss", "instance", "prior"}
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-6, atol=0, msg=name)


def test_lora_at_bf16_holds_the_frozen_networks_in_bf16_and_trains_fp32_adapters(flow_teachers, subject_dir,
                                                                                  tmp_path):
    """As the scripts: the transformer and text encoders cast to the mixed-precision dtype, the adapters to fp32."""
    from bksdm.dreambooth.config import load_dreambooth_config
    from bksdm.recipes.dreambooth import DreamBooth

    cfg = load_dreambooth_config("sd3", None, model=str(flow_teachers["sd3"]), instance_dir=str(subject_dir),
                                 instance_prompt="a red triangle", with_prior=False, resolution=32, max_steps=2,
                                 out=str(tmp_path / "o"), mixed_precision="bf16", gradient_checkpointing=False)
    run = DreamBooth(cfg).setup()
    dtypes = {n: p.dtype for n, p in run.denoiser.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora" not in n} == {torch.bfloat16}
    assert {p.dtype for part in run.text_parts.values() if isinstance(part, torch.nn.Module)
            for p in part.parameters()} == {torch.bfloat16}
    result = run.train()
    assert math.isfinite(result["history"][-1]["loss"])
    assert (tmp_path / "o" / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_full_finetune_writes_a_transformer_pipeline_with_its_card(flow_teachers, subject_dir, tmp_path):
    from diffusers import FluxTransformer2DModel
    from huggingface_hub import ModelCard

    out = tmp_path / "full"
    assert _ft(flow_teachers["flux"], subject_dir, out, "--no-train-text-encoder", "--no-with-prior",
               "--lr", "1e-3") == 0
    tuned = FluxTransformer2DModel.from_pretrained(out / "final" / "transformer")
    base = FluxTransformer2DModel.from_pretrained(flow_teachers["flux"] / "transformer")
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), base.state_dict().values()))
    assert not (out / "final" / "unet").exists()
    card = ModelCard.load(out / "final" / "README.md")
    assert "dreambooth" in card.data.tags and "frozen" in card.text
    assert _image(_pipe("flux", out / "final")).shape == (1, 3, 32, 32)


def test_unet_only_options_are_refused_in_one_line_before_the_pictures(flow_teachers, tmp_path, capsys):
    empty = tmp_path / "empty"  # no pictures: the refusal comes first
    empty.mkdir()
    assert _ft(flow_teachers["sd3"], empty, tmp_path / "a", "--lora") == 2  # the paper default trains the text encoder
    assert "trains the transformer only" in one_line_error(capsys)
    assert _ft(flow_teachers["flux"], empty, tmp_path / "b", "--lora", "--no-train-text-encoder") == 2  # bk-sdm preset
    assert "lora_preset bk-sdm has no targets for FluxPipeline" in one_line_error(capsys)
    assert main(["dreambooth-bench", "--model", str(flow_teachers["sd3"]), "--dataset", str(empty), "--out",
                 str(tmp_path / "c")]) == 2  # its samplers are U-Net ones
    assert "not supported by `bksdm dreambooth-bench`" in one_line_error(capsys)
