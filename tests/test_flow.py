"""Flow matching and the transformer families (SD3, Flux): objectives against diffusers' training utilities and
pipeline functions on the same draws, prompt encoding and the transformer call against the pipelines' own code on
tiny random pipelines, and `bksdm generate` on them (batch-size invariant)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import WORDS

T5_LEN = 12  # a short T5 sequence keeps the tiny pipelines fast; the families take it as max_sequence_length


# ----------------------------------------------------------------------------------------------- tiny pipelines
def _clip(cls, vocab: int, width: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, hidden_act="gelu",
                         projection_dim=projection or width, eos_token_id=3, bos_token_id=2, pad_token_id=0)
    return cls(cfg)


def _t5(vocab: int, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=width, d_ff=2 * width, d_kv=8, num_layers=2, num_heads=2,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=3))


def _t5_tokenizer():
    """A real T5 tokenizer (transformers' ``T5Tokenizer``: SentencePiece-style Unigram, ``</s>`` appended) over the
    test words, built offline from a vocabulary list."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[4, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4,
                         latent_channels=latent_channels, sample_size=32, shift_factor=0.0609, scaling_factor=1.5035)


def _eval(pipe):
    """Networks in eval mode, as from_pretrained leaves them (a freshly built T5 would apply dropout)."""
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.eval()
    return pipe


def tiny_sd3(t5: bool = True, seed: int = 0):
    """StableDiffusion3Pipeline: CLIP-with-projection x2 (width 16, pooled 8 each; word-level tokenizers), T5 (width
    32, a real T5 tokenizer) or none, an MMDiT
    of 3 joint blocks (patch 2), a VAE of factor 2 with 4 latent channels, the SD3 scheduler (shift 3.0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from bksdm.mini.model import make_tokenizer

    torch.manual_seed(seed)
    tok = [make_tokenizer(WORDS, 10), make_tokenizer(WORDS, 10), _t5_tokenizer()]
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16)
    return _eval(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(4),
        text_encoder=_clip(CLIPTextModelWithProjection, len(tok[0]), 16, 8), tokenizer=tok[0],
        text_encoder_2=_clip(CLIPTextModelWithProjection, len(tok[1]), 16, 8), tokenizer_2=tok[1],
        text_encoder_3=_t5(len(tok[2]), 32) if t5 else None, tokenizer_3=tok[2] if t5 else None))


def tiny_flux(guidance: bool = True, seed: int = 0):
    """FluxPipeline: CLIP (width 16, pooled 16), T5 (width 32), a transformer of 1 double and 2 single blocks
    (rotary axes 2/2/4), a VAE of factor 2 with 2 latent channels (packed: 8), Flux's dynamic-shift scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from bksdm.mini.model import make_tokenizer

    torch.manual_seed(seed)
    tok, tok2 = make_tokenizer(WORDS, 10), _t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=guidance, axes_dims_rope=[2, 2, 4])
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                            max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    return _eval(FluxPipeline(transformer=transformer, scheduler=sched, vae=_vae(2),
                              text_encoder=_clip(CLIPTextModel, len(tok), 16), tokenizer=tok,
                              text_encoder_2=_t5(len(tok2), 32), tokenizer_2=tok2))


def _family(pipe, **kw):
    from bksdm.arch.flow_families import family_for

    names = [n for n, c in pipe.components.items() if c is not None]
    return dataclasses.replace(family_for(pipe.transformer.config, names), max_sequence_length=T5_LEN, **kw)


def _parts(pipe, family):
    return {n: getattr(pipe, n) for n in family.text_components}


TEXTS = ["a red circle at the top", "a small blue square", "green triangle left and right"]


# ----------------------------------------------------------------------------------------------- objectives
def _reference_noisy_inputs(scheduler, latents, gen, weights=None):
    """training.noisy_inputs as it was before the objectives existed (the reference for bit equality)."""
    noise = torch.randn(latents.shape, generator=gen).to(latents.device)
    if weights is None:
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
    else:
        t = torch.multinomial(weights, latents.shape[0], replacement=True, generator=gen)
    t = t.to(latents.device)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    return scheduler.add_noise(latents, noise, t), t, target


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("biased", [False, True])
def test_ddpm_objective_draws_exactly_what_noisy_inputs_drew(prediction, biased):
    from diffusers import DDPMScheduler

    from bksdm.objectives import DDPMObjective
    from bksdm.training import noisy_inputs, timestep_weights

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction)
    w = timestep_weights(1000, "later", 0.25, 3.0) if biased else None
    lat = torch.randn(5, 4, 8, 8)
    ref = _reference_noisy_inputs(sched, lat, torch.Generator().manual_seed(3), w)
    obj = DDPMObjective(sched, w).sample(lat, torch.Generator().manual_seed(3))
    wrap = noisy_inputs(sched, lat, torch.Generator().manual_seed(3), w)
    for a, b, c in zip(ref, obj, wrap):
        assert torch.equal(a, b) and torch.equal(a, c)
    noisy, t, target = obj
    x0 = DDPMObjective(sched).x0(target, noisy, t)  # the target is what the network predicts: x0 comes back
    assert torch.allclose(x0, lat, atol=1e-4)


def test_ddpm_objective_sample_prediction_targets_the_latents():
    from diffusers import DDPMScheduler

    from bksdm.objectives import DDPMObjective

    obj = DDPMObjective(DDPMScheduler(prediction_type="sample"))
    lat = torch.randn(2, 4, 4, 4)
    noisy, t, target = obj.sample(lat, torch.Generator().manual_seed(0))
    assert torch.equal(target, lat)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_ddpm_x0_is_the_schedulers_pred_original_sample(prediction):
    """x0 from a network output is what diffusers' own DDPMScheduler.step computes, for every parameterisation."""
    from diffusers import DDPMScheduler

    from bksdm.objectives import DDPMObjective

    sched = DDPMScheduler(prediction_type=prediction, clip_sample=False, beta_schedule="scaled_linear")
    noisy, out = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.randn(3, 4, 4, 4)
    for step in (0, 420, 999):
        ref = sched.step(out, step, noisy).pred_original_sample
        ours = DDPMObjective(sched).x0(out, noisy, torch.full((3,), step))
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_load_objective_of_a_sd_folder_draws_what_the_trainer_draws(tiny_teacher_dir):
    """The Trainer's DDPMScheduler.from_pretrained + noisy_inputs, and load_objective of the same folder: equal."""
    from diffusers import DDPMScheduler

    from bksdm.objectives import load_objective
    from bksdm.training import noisy_inputs

    lat = torch.randn(3, 4, 8, 8)
    ref = noisy_inputs(DDPMScheduler.from_pretrained(tiny_teacher_dir, subfolder="scheduler"), lat,
                       torch.Generator().manual_seed(2))
    got = load_objective(tiny_teacher_dir).sample(lat, torch.Generator().manual_seed(2))
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_latent_space_applies_the_vaes_shift_as_the_pipelines_undo_it():
    from bksdm.training import to_latent_space

    z = torch.randn(2, 4, 4, 4)
    sd3 = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
    assert torch.allclose(to_latent_space(z, sd3) / 1.5305 + 0.0609, z, atol=1e-6)  # the pipelines' decode
    assert torch.equal(to_latent_space(z, {"scaling_factor": 0.18215, "shift_factor": None}), z * 0.18215)


def _diffusers_script_draw(sched, latents, gen, density, mode_scale=1.29):
    """What diffusers' examples/dreambooth/train_dreambooth_sd3.py does: noise, u, indices, timesteps, get_sigmas."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    noise = torch.randn(latents.shape, generator=gen)
    u = compute_density_for_timestep_sampling(density, latents.shape[0], 0.0, 1.0, mode_scale, generator=gen)
    indices = (u * sched.config.num_train_timesteps).long()
    timesteps = sched.timesteps[indices]
    step_indices = [(sched.timesteps == t).nonzero().item() for t in timesteps]  # get_sigmas
    sigmas = sched.sigmas[step_indices].flatten()[:, None, None, None]
    return (1.0 - sigmas) * latents + sigmas * noise, timesteps, noise - latents


@pytest.mark.parametrize("density", ["logit_normal", "uniform", "mode"])
def test_flow_objective_matches_diffusers_sd3_training_draws(density):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from bksdm.objectives import objective_for

    config = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)  # SD3's scheduler config
    obj = objective_for(config, density=density)
    lat = torch.randn(16, 4, 8, 8)
    ref = _diffusers_script_draw(FlowMatchEulerDiscreteScheduler.from_config(config), lat,
                                 torch.Generator().manual_seed(7), density)
    got = obj.sample(lat, torch.Generator().manual_seed(7))
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    noisy, t, target = got
    assert torch.allclose(obj.x0(target, noisy, t), lat, atol=1e-5)  # x0 = x_t - sigma * (eps - x0)
    assert float(t.min()) > 0 and float(t.max()) <= 1000


def test_flow_objective_flux_dynamic_shift_is_the_pipelines():
    """mu from the packed token count by FluxPipeline's calculate_shift; sigmas shifted as set_timesteps shifts
    them at inference."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_shift
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from bksdm.objectives import FlowObjective, calculate_shift, objective_for

    cfg = dict(FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                               max_image_seq_len=4096, base_shift=0.5, max_shift=1.15).config)
    obj = objective_for(cfg)
    lat = torch.randn(6, 16, 64, 48)  # 512 x 384 px with Flux's VAE
    tokens = FluxPipeline._pack_latents(lat, 6, 16, 64, 48).shape[1]
    mu = flux_shift(tokens, 256, 4096, 0.5, 1.15)
    assert obj.mu(64, 48) == mu == calculate_shift(tokens)
    gen = torch.Generator().manual_seed(1)
    torch.randn(lat.shape, generator=gen)
    u = compute_density_for_timestep_sampling("logit_normal", 6, 0.0, 1.0, None, generator=gen)
    base = (1 - (u * 1000).long() / 1000).numpy()  # the unshifted table: sigma_i = 1 - i / T
    ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    ref.set_timesteps(sigmas=base.tolist(), mu=mu)  # the inference path's shift of the same sigmas
    noisy, t, target = obj.sample(lat, torch.Generator().manual_seed(1))
    assert torch.allclose(t / 1000, ref.sigmas[:-1], atol=1e-6)
    unshifted = FlowObjective(obj.scheduler, dynamic_shift=False).sample(lat, torch.Generator().manual_seed(1))[1]
    assert torch.allclose(unshifted / 1000, torch.tensor(base, dtype=torch.float32), atol=1e-6)
    assert bool((t > unshifted).all())  # 3072 tokens shift towards noise


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_flow_loss_weights_are_diffusers(weighting):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    from bksdm.objectives import objective_for

    obj = objective_for(dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config), weighting=weighting)
    _, t, _ = obj.sample(torch.randn(8, 4, 4, 4), torch.Generator().manual_seed(0))
    assert torch.allclose(obj.weight(t), compute_loss_weighting_for_sd3(weighting, t / 1000), rtol=1e-5)


def test_flow_draws_depend_only_on_the_generator():
    """Exact resume: the same seed gives the same draws whatever the latents' values, and the generator moves on."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from bksdm.objectives import objective_for

    obj = objective_for(dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config))
    a, b = torch.zeros(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    na, ta, _ = obj.sample(a, g1)
    nb, tb, _ = obj.sample(b, g2)
    assert torch.equal(ta, tb) and torch.equal(g1.get_state(), g2.get_state())
    s = (ta / 1000)[:, None, None, None]
    assert torch.allclose(nb - (1 - s) * b, na, atol=1e-6)  # the same noise
    assert not torch.equal(obj.sample(a, g1)[1], ta)


def test_objective_for_picks_by_scheduler_and_refuses_what_does_not_apply(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, PNDMScheduler

    from bksdm.errors import UserError
    from bksdm.objectives import DDPMObjective, FlowObjective, is_flow_config, load_objective, objective_for

    pndm = dict(PNDMScheduler(prediction_type="v_prediction").config, _class_name="PNDMScheduler")
    assert isinstance(objective_for(pndm), DDPMObjective) and objective_for(pndm).name == "v_prediction"
    flow = dict(FlowMatchEulerDiscreteScheduler().config, _class_name="FlowMatchEulerDiscreteScheduler")
    assert isinstance(objective_for(flow), FlowObjective) and objective_for(flow).name == "flow"
    assert is_flow_config(flow) and not is_flow_config(pndm) and is_flow_config(FlowMatchEulerDiscreteScheduler().config)
    with pytest.raises(UserError, match="flow-matching"):
        objective_for(pndm, density="uniform")
    with pytest.raises(UserError, match="timestep density"):
        objective_for(flow, density="beta")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(tmp_path / "p" / "scheduler")
    assert load_objective(tmp_path / "p").scheduler.config.shift == 3.0
    (tmp_path / "p" / "scheduler" / "scheduler_config.json").write_text("{")
    with pytest.raises(UserError, match="scheduler config"):
        load_objective(tmp_path / "p")


# ----------------------------------------------------------------------------------------------- families
@pytest.mark.parametrize("t5", [True, False])
def test_sd3_encode_prompt_is_the_pipelines(t5):
    pipe = tiny_sd3(t5)
    fam = _family(pipe)
    assert fam.name == "sd3" and fam.t5 == t5 and fam.backbone == "transformer"
    with torch.no_grad():
        pe, npe, ppe, nppe = pipe.encode_prompt(TEXTS, None, None, device="cpu", do_classifier_free_guidance=True,
                                                max_sequence_length=T5_LEN)
        cond = fam.encode_prompt(_parts(pipe, fam), TEXTS, "cpu")
        unc = fam.unconditional(_parts(pipe, fam), "cpu")
    assert cond["encoder_hidden_states"].shape == (3, 10 + T5_LEN, 32) and cond["pooled_projections"].shape == (3, 16)
    assert torch.equal(cond["encoder_hidden_states"], pe) and torch.equal(cond["pooled_projections"], ppe)
    # the pipeline encodes B copies of "" at once, the family one: batched kernels may round the last bit apart
    assert torch.allclose(unc["encoder_hidden_states"].expand_as(npe), npe, atol=1e-6, rtol=0)
    assert torch.allclose(unc["pooled_projections"].expand_as(nppe), nppe, atol=1e-6, rtol=0)
    assert (cond["encoder_hidden_states"][:, 10:].abs().sum() == 0) == (not t5)  # T5 zeros without text_encoder_3
    if t5:  # the T5 tokenizer knows the words (a vocabulary of <unk> would make every prompt alike)
        assert pipe.tokenizer_3("a red circle").input_ids == [3 + WORDS.index(w) for w in ("a", "red", "circle")] + [1]
    assert fam.from_cache(fam.to_cache(cond)).keys() == cond.keys()


@pytest.mark.parametrize("guidance", [True, False])
def test_flux_encode_prompt_is_the_pipelines(guidance):
    pipe = tiny_flux(guidance)
    fam = _family(pipe)
    assert fam.name == "flux" and fam.guidance_embeds == guidance and not fam.classifier_free
    with torch.no_grad():
        pe, ppe, text_ids = pipe.encode_prompt(TEXTS, None, device="cpu", max_sequence_length=T5_LEN)
        cond = fam.encode_prompt(_parts(pipe, fam), TEXTS, "cpu")
    assert torch.equal(cond["encoder_hidden_states"], pe) and torch.equal(cond["pooled_projections"], ppe)
    assert cond["encoder_hidden_states"].shape == (3, T5_LEN, 32) and text_ids.shape == (T5_LEN, 3)
    added = fam.added_conditioning(3, 32, "cpu")
    assert (list(added) == ["guidance"]) == guidance
    if guidance:
        assert added["guidance"].shape == (3,) and float(added["guidance"][0]) == 3.5


def test_flux_packing_and_ids_are_the_pipelines():
    from diffusers import FluxPipeline

    from bksdm.arch.flow_families import latent_image_ids, pack_latents, unpack_latents

    x = torch.randn(2, 3, 8, 12)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 3, 8, 12)) and packed.shape == (2, 24, 12)
    assert torch.equal(unpack_latents(packed, 8, 12), x)
    assert torch.equal(unpack_latents(packed, 8, 12), FluxPipeline._unpack_latents(packed, 16, 24, 2))
    assert torch.equal(latent_image_ids(8, 12, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32))


def _one_step(pipe, fam, x, sigma, **kw):
    """The pipeline's one Euler step from latents ``x`` at the custom sigma, and the step's sigmas / timestep."""
    out = pipe(TEXTS[:2], height=32, width=32, num_inference_steps=1, sigmas=[sigma], latents=x, output_type="latent",
               max_sequence_length=T5_LEN, **kw).images
    return out, pipe.scheduler.sigmas, pipe.scheduler.timesteps


@pytest.mark.parametrize("t5", [True, False])
def test_sd3_denoise_is_the_pipelines_call(t5):
    """One pipeline step (no guidance) from x: x + (s1 - s0) * v(x, t0); the family's call gives that v."""
    pipe = tiny_sd3(t5)
    fam = _family(pipe)
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        out, sigmas, ts = _one_step(pipe, fam, x, 0.4, guidance_scale=1.0)
        cond = fam.encode_prompt(_parts(pipe, fam), TEXTS[:2], "cpu")
        v = fam.denoise(pipe.transformer, x, ts[0].expand(2), cond)
    assert 0 < float(ts[0]) < 1000
    assert torch.allclose(out, x + (sigmas[1] - sigmas[0]) * v, atol=1e-6)


@pytest.mark.parametrize("guidance", [True, False])
def test_flux_denoise_is_the_pipelines_call(guidance):
    """Packing, position ids, timestep / 1000 and the embedded guidance, checked through one pipeline step."""
    from bksdm.arch.flow_families import pack_latents

    pipe = tiny_flux(guidance)
    fam = _family(pipe, guidance=2.5)
    x = torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        out, sigmas, ts = _one_step(pipe, fam, pack_latents(x), 0.5, guidance_scale=2.5)
        cond = {**fam.encode_prompt(_parts(pipe, fam), TEXTS[:2], "cpu"), **fam.added_conditioning(2, 32, "cpu")}
        v = fam.denoise(pipe.transformer, x, ts[0].expand(2), cond)
        if guidance:  # the guidance input matters, so the check above covers it
            other = fam.denoise(pipe.transformer, x, ts[0].expand(2), {**cond, "guidance": cond["guidance"] * 0 + 7})
            assert not torch.allclose(v, other)
    assert 0 < float(ts[0]) < 1000
    assert torch.allclose(out, pack_latents(x + (sigmas[1] - sigmas[0]) * v), atol=1e-6)


def test_family_detection_from_pipeline_folders(tmp_path, tiny_teacher_dir):
    from bksdm.errors import UserError
    from bksdm.models import generation_parts, pipeline_family

    tiny_sd3(t5=False).save_pretrained(tmp_path / "sd3")
    tiny_flux(guidance=False).save_pretrained(tmp_path / "flux")
    assert json.loads((tmp_path / "sd3" / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    sd3, flux = pipeline_family(tmp_path / "sd3"), pipeline_family(tmp_path / "flux")
    assert (sd3.name, sd3.t5, sd3.joint_attention_dim) == ("sd3", False, 32)
    assert (flux.name, flux.guidance_embeds) == ("flux", False)
    assert generation_parts(tmp_path / "sd3") == ("transformer", "vae", "tokenizer", "text_encoder", "tokenizer_2",
                                                  "text_encoder_2")
    assert generation_parts(tiny_teacher_dir)[0] == "unet" and pipeline_family(tiny_teacher_dir).name == "sd"
    cfg = tmp_path / "flux" / "transformer" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "_class_name": "PixArtTransformer2DModel"}))
    with pytest.raises(UserError, match="not supported"):
        pipeline_family(tmp_path / "flux")


def test_latent_shapes_and_refused_sizes():
    from bksdm.arch.flow_families import FluxFamily, SD3Family
    from bksdm.errors import UserError

    assert FluxFamily().latent_shape({"in_channels": 64}, 1024, 8) == (16, 128, 128)
    assert FluxFamily().resolution({}, 8) == 1024
    assert SD3Family().latent_shape({"in_channels": 16, "patch_size": 2}, 1024, 8) == (16, 128, 128)
    with pytest.raises(UserError, match="multiples of 16"):
        FluxFamily().latent_shape({"in_channels": 64}, 1000, 8)
    with pytest.raises(UserError, match="multiples of 16"):
        SD3Family().latent_shape({"in_channels": 16, "patch_size": 2}, 1000, 8)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_one_flow_training_step_through_objective_and_family(kind):
    """What a distillation step will do: encode, draw (noisy, t, target), call the backbone through the family,
    weighted MSE, backward; and the family's dummy conditioning fits the transformer (profile, inspect)."""
    from bksdm.objectives import objective_for

    pipe = tiny_sd3() if kind == "sd3" else tiny_flux()
    fam = _family(pipe)
    obj = objective_for(pipe.scheduler.config, weighting="cosmap")
    with torch.no_grad():
        cond = {**fam.encode_prompt(_parts(pipe, fam), TEXTS[:2], "cpu"), **fam.added_conditioning(2, 32, "cpu")}
    c = pipe.transformer.config.in_channels // (4 if kind == "flux" else 1)
    lat = torch.randn(2, c, 16, 16)
    noisy, t, target = obj.sample(lat, torch.Generator().manual_seed(0))
    pred = fam.denoise(pipe.transformer.train(), noisy, t, cond)
    loss = (obj.weight(t) * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()
    loss.backward()
    assert pred.shape == lat.shape and torch.isfinite(loss)
    assert all(p.grad is not None for p in pipe.transformer.parameters() if p.requires_grad)
    with torch.no_grad():
        dummy = fam.dummy_conditioning(pipe.transformer.config, 2, "cpu", torch.float32)
        assert fam.denoise(pipe.transformer.eval(), noisy, t, dummy).shape == lat.shape


# ----------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("kind", ["sd3", "sd3-no-t5", "flux", "flux-schnell"])
def test_generate_on_transformer_pipelines_is_batch_invariant(kind, tmp_path, prompts_csv_texts):
    from bksdm.cli import main

    pipe = tiny_sd3(t5=kind == "sd3") if kind.startswith("sd3") else tiny_flux(guidance=kind == "flux")
    pipe.save_pretrained(tmp_path / "model")
    runs = {}
    for b in (1, 3):
        out = tmp_path / f"b{b}"
        assert main(["generate", "--model", str(tmp_path / "model"), "--prompts", str(prompts_csv_texts), "--out",
                     str(out), "--steps", "2", "--resolution", "32", "--save-size", "16", "--dtype", "fp32",
                     "--lossless", "--batch-size", str(b)]) == 0
        runs[b] = {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted((out / "images").iterdir())}
    assert len(runs[1]) == 4 and runs[1].keys() == runs[3].keys()
    for name in runs[1]:
        assert runs[1][name].shape == (32, 32, 3)
        assert np.abs(runs[1][name] - runs[3][name]).max() <= 1, name
    first, second = list(runs[1].values())[:2]
    assert np.abs(first - second).max() > 0


def test_generate_refuses_unet_options_on_transformer_pipelines(tmp_path, prompts_csv_texts, capsys):
    from bksdm.cli import main
    from tests.conftest import one_line_error

    tiny_flux(guidance=False).save_pretrained(tmp_path / "model")
    capsys.readouterr()  # saving's progress bars
    for extra, what in ((["--scheduler", "ddim"], "--scheduler ddim"), (["--scheduler", "pndm"], "--scheduler pndm"),
                        (["--cache-interval", "2"], "--cache-interval"), (["--cache-branch", "1"], "--cache-branch"),
                        (["--decoder", "taesd"], "--decoder"),
                        (["--compile"], "--compile")):
        code = main(["generate", "--model", str(tmp_path / "model"), "--prompts", str(prompts_csv_texts), "--out",
                     str(tmp_path / "o"), "--steps", "1", "--dtype", "fp32", *extra])
        assert code == 2 and what in one_line_error(capsys)
    # another flow sampler in the folder: refused rather than swapped for Euler with a warning
    import json

    cfg = tmp_path / "model" / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "_class_name": "FlowMatchHeunDiscreteScheduler"}))
    code = main(["generate", "--model", str(tmp_path / "model"), "--prompts", str(prompts_csv_texts), "--out",
                 str(tmp_path / "o"), "--steps", "1", "--dtype", "fp32"])
    assert code == 2 and "FlowMatchHeunDiscreteScheduler" in one_line_error(capsys)
    assert not (tmp_path / "o" / "images").exists()  # refused before any work


def test_objective_reads_every_flow_scheduler_and_refuses_a_config_without_betas():
    """A FlowMatchHeun/LCM config is a flow teacher too; a config with neither betas nor a flow class is not
    silently taken for linear-beta epsilon DDPM."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from bksdm.errors import UserError
    from bksdm.objectives import FlowObjective, objective_for

    cfg = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    for name in ("FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler"):
        assert isinstance(objective_for({**cfg, "_class_name": name}), FlowObjective)
    with pytest.raises(UserError, match="neither beta_schedule nor trained_betas"):
        objective_for({"_class_name": "SomeScheduler", "num_train_timesteps": 1000})


@pytest.fixture
def prompts_csv_texts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join([*TEXTS, "a large red square at the bottom"]) + "\n")
    return p
