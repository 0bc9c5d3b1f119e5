"""`bksdm lcm`: latent consistency distillation (full and LCM-LoRA) of a tiny student, its outputs in diffusers,
`generate --scheduler lcm`, exact resume, and the consistency maths against diffusers' LCMScheduler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bksdm.cli import main
from bksdm.lcm.config import LCMConfig, load_lcm_config
from bksdm.recipes.lcm import LCMRecipe
from tests.conftest import make_tiny_pipeline, one_line_error


@pytest.fixture(scope="module")
def student_dir(tiny_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lcm") / "student"
    assert main(["compress", "--teacher", str(tiny_teacher_dir), "--student", "bk-small", "--out", str(out)]) == 0
    return out


def lcm_cfg(model, out, **kw) -> LCMConfig:
    base = dict(model=str(model), data="mini-world:16", out=str(out), resolution=32, batch_size=4, max_steps=2,
                mixed_precision="no", num_workers=0, report_to="none", gradient_checkpointing=False,
                checkpoint_every=100, lr=1e-3, lora_lr=1e-3, lora_rank=4, time_cond_proj_dim=16)
    return LCMConfig().update(base | kw, "test")


def test_shipped_yaml_equals_defaults():
    import yaml
    from pathlib import Path

    path = Path(__file__).parents[1] / "src" / "bksdm" / "configs" / "lcm_paper.yaml"
    assert yaml.safe_load(path.read_text()) == LCMConfig().to_dict()
    assert load_lcm_config("paper") == LCMConfig() == load_lcm_config("lcm-paper")
    assert load_lcm_config("mini").resolution == 32


def test_one_step_names_finite_terms_and_the_student_starts_as_the_model(student_dir, tiny_teacher_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from bksdm.distill.loader import micro_batches

    r = LCMRecipe(lcm_cfg(student_dir, tmp_path / "r", teacher=str(tiny_teacher_dir))).setup()
    batch = next(micro_batches(r.source, 0, False, 32, 4, 0, 1, 0))
    terms = r.loss_step(batch, torch.Generator().manual_seed(0))
    assert set(terms) == {"loss", "mse"} and all(torch.isfinite(v) for v in terms.values())
    assert terms["loss"].requires_grad
    # the zero-initialised guidance input: at any w the student equals the model it came from
    model = UNet2DConditionModel.from_pretrained(student_dir / "unet")
    x, t, emb = torch.randn(2, 12, 16, 16), torch.tensor([10, 900]), torch.randn(2, 24, 16)
    with torch.no_grad():
        a = model(x, t, emb).sample
        b = r.student(x, t, emb, timestep_cond=torch.randn(2, 16)).sample
    torch.testing.assert_close(a, b)


def test_the_target_is_an_ema_of_the_student(student_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    r = LCMRecipe(lcm_cfg(student_dir, tmp_path / "e", checkpoint_every=1, ema_decay=0.7)).setup()
    t0 = {k: v.clone() for k, v in r.target.state_dict().items()}
    r.train()
    s1, s2 = (UNet2DConditionModel.from_pretrained(tmp_path / "e" / "checkpoints" / f"step-{i}" / "unet").state_dict()
              for i in (1, 2))
    d = 0.7
    changed = 0
    for k, v in r.target.state_dict().items():
        want = d * d * t0[k] + d * (1 - d) * s1[k] + (1 - d) * s2[k]
        torch.testing.assert_close(v, want, rtol=1e-5, atol=1e-6, msg=k)
        changed += not torch.equal(v, t0[k])
    assert changed > 0  # the student moved, so did its EMA: the check can fail


def test_killed_and_resumed_equals_uninterrupted(student_dir, tmp_path):
    kw = dict(checkpoint_every=2, max_steps=4, seed=3)
    full = LCMRecipe(lcm_cfg(student_dir, tmp_path / "a", **kw)).setup()
    full.train()
    part = LCMRecipe(lcm_cfg(student_dir, tmp_path / "b", **kw)).setup()
    part.cfg.max_steps = 2  # "killed" after the step-2 checkpoint
    part.train()
    resumed = LCMRecipe(lcm_cfg(student_dir, tmp_path / "b", **kw, resume="latest")).setup()
    assert resumed.step == 2
    resumed.train()
    for name in ("student", "target"):
        a = getattr(full, name).state_dict()
        b = getattr(resumed, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def _images(pipe, steps=2, guidance=7.5):
    out = pipe(["a red circle at the top left"], num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images


def test_full_output_loads_with_lcm_scheduler_and_generates(student_dir, tmp_path, capsys):
    from diffusers import DiffusionPipeline, LCMScheduler
    from huggingface_hub import ModelCard

    out = tmp_path / "full"
    assert main(["lcm", "--model", str(student_dir), "--data", "mini-world:16", "--out", str(out), "--resolution", "32",
                 "--batch-size", "4", "--max-steps", "2", "--mixed-precision", "no", "--num-workers", "0",
                 "--report-to", "none", "--no-gradient-checkpointing", "time_cond_proj_dim=16",
                 "num_ddim_timesteps=25", "timestep_scaling=1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] > 0
    pipe = DiffusionPipeline.from_pretrained(out / "final", safety_checker=None)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim == 16
    # the scheduler it trained for, not LCMScheduler's defaults (50, 10.0)
    assert (pipe.scheduler.config.original_inference_steps, pipe.scheduler.config.timestep_scaling) == (25, 1.0)
    assert np.isfinite(_images(pipe)).all()
    assert "latent-consistency" in ModelCard.load(out / "final" / "README.md").data.tags
    assert json.loads((out / "final" / "bksdm.json").read_text())["lcm"]["steps"] == 2
    lines = (out / "logs" / "losses.csv").read_text().splitlines()
    assert lines[0].startswith("step,loss,mse,lr") and len(lines) == 3
    # profile: an LCM U-Net embeds the guidance scale, so one U-Net call at batch 1 per step and one text encoding
    assert main(["profile", "--model", str(out / "final"), str(student_dir), "--steps", "4", "--json", "--dtypes",
                 "fp32", "--runs", "1"]) == 0
    lcm, plain = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert (lcm["guidance_batch"], plain["guidance_batch"]) == (1, 2)
    lat, lat2 = lcm["latency_s"]["fp32"], plain["latency_s"]["fp32"]
    assert lat["whole"] == pytest.approx(lat["text_encoder"] + 4 * lat["unet"] + lat["vae_decoder"], abs=4e-4)
    assert lat2["whole"] == pytest.approx(2 * lat2["text_encoder"] + 4 * lat2["unet"] + lat2["vae_decoder"], abs=4e-4)


def test_lora_output_loads_on_the_student_and_on_another_model_of_its_architecture(student_dir, tiny_teacher_dir, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    out = tmp_path / "lora"
    r = LCMRecipe(lcm_cfg(student_dir, out, lora=True, teacher=str(tiny_teacher_dir)))
    r.setup().train()
    file = out / "final" / "pytorch_lora_weights.safetensors"
    assert file.is_file() and not (out / "final" / "unet").exists()
    shipped = LCMScheduler.from_pretrained(out / "final", subfolder="scheduler").config  # the schedule it trained for
    assert (shipped.original_inference_steps, shipped.timestep_scaling) == (r.cfg.num_ddim_timesteps, r.cfg.timestep_scaling)
    # another model of the same architecture: a student compressed from a differently seeded teacher
    make_tiny_pipeline(seed=7).save_pretrained(tmp_path / "t7")
    assert main(["compress", "--teacher", str(tmp_path / "t7"), "--student", "bk-small", "--out", str(tmp_path / "s7")]) == 0
    for base in (student_dir, tmp_path / "s7"):
        pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        before = _images(pipe, guidance=1.0)
        pipe.load_lora_weights(out / "final")
        assert any("lora" in n for n, _ in pipe.unet.named_parameters())
        after = _images(pipe, guidance=1.0)
        assert np.isfinite(after).all() and not np.array_equal(before, after)  # the adapter is active


def test_generate_with_lcm_is_batch_invariant(student_dir, tmp_path):
    from PIL import Image

    r = LCMRecipe(lcm_cfg(student_dir, tmp_path / "g"))
    r.setup().train()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle at the top left\na large blue square at the bottom right\na small green triangle at the top right\n")
    common = ["generate", "--model", str(tmp_path / "g" / "final"), "--prompts", str(prompts), "--scheduler", "lcm",
              "--steps", "4", "--save-size", "0", "--lossless", "--dtype", "fp32"]
    assert main(common + ["--out", str(tmp_path / "b1"), "--batch-size", "1"]) == 0
    assert main(common + ["--out", str(tmp_path / "b3"), "--batch-size", "3"]) == 0
    for i in range(3):
        a = np.asarray(Image.open(tmp_path / "b1" / "images" / f"{i:05d}.png"), dtype=int)
        b = np.asarray(Image.open(tmp_path / "b3" / "images" / f"{i:05d}.png"), dtype=int)
        assert np.abs(a - b).max() <= 1, i


def test_lcm_faults(student_dir, tmp_path, capsys):
    from bksdm.mini.model import build_pipeline, unet_config
    from tests.conftest import TINY_UNET, WORDS

    base = ["lcm", "--model", str(student_dir), "--data", "mini-world:8", "--out", str(tmp_path / "o"),
            "--resolution", "32", "--mixed-precision", "no", "--report-to", "none"]
    assert main(["lcm", "--data", "mini-world:8", "--out", str(tmp_path / "o")]) == 2
    assert "no model" in one_line_error(capsys)
    assert main(base + ["w_min=9", "w_max=3"]) == 2
    assert "w_min" in one_line_error(capsys)
    assert main(base + ["--loss-type", "l1"]) == 2
    assert "l1" in one_line_error(capsys)
    other = tmp_path / "other"
    build_pipeline(WORDS, unet=unet_config(**{**TINY_UNET, "cross_attention_dim": 8}), text_width=8).save_pretrained(other)
    assert main(base + ["--teacher", str(other)]) == 2
    assert "does not fit" in one_line_error(capsys)
    assert main(base + ["--model", str(tmp_path / "missing")]) == 2
    assert "missing" in one_line_error(capsys)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle at the top left\n")
    gen = ["generate", "--model", str(student_dir), "--prompts", str(prompts), "--out", str(tmp_path / "g"),
           "--scheduler", "lcm", "--steps", "2", "--save-size", "0"]
    assert main(gen + ["--lora", str(tmp_path / "nope.safetensors")]) == 2
    assert "LoRA file" in one_line_error(capsys)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    assert main(gen + ["--lora", str(junk)]) == 2
    assert "junk.safetensors" in one_line_error(capsys)
    assert not list((tmp_path / "g" / "images").glob("*.jpg"))  # nothing generated


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_consistency_maths_against_the_diffusers_schedule(prediction):
    """x0/eps recovered exactly from each parameterisation; a DDIM solver step with the true (x0, eps) lands on the
    forward-noised latent at the previous solver timestep; the scalings equal LCMScheduler's."""
    from diffusers import DDPMScheduler, LCMScheduler

    from bksdm.lcm import solver as S

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    solver = S.DDIMSolver(sched.alphas_cumprod, 50)
    index = torch.tensor([0, 17, 49])
    t = solver.timesteps[index]
    assert t.tolist() == [19, 359, 999]
    noisy = sched.add_noise(x0, eps, t)
    out = eps if prediction == "epsilon" else sched.get_velocity(x0, eps, t)
    rx0, reps = S.x0_and_eps(out, t, noisy, sched.alphas_cumprod, prediction)
    torch.testing.assert_close(rx0, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reps, eps, rtol=1e-4, atol=1e-4)
    prev = solver.step(x0, eps, index)
    torch.testing.assert_close(prev[1:], sched.add_noise(x0, eps, t - 20)[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prev[0], x0[0] * sched.alphas_cumprod[0].sqrt() + eps[0] * (1 - sched.alphas_cumprod[0]).sqrt())
    lcm = LCMScheduler()
    for tt in (0, 19, 500):
        want = lcm.get_scalings_for_boundary_condition_discrete(tt)
        got = S.boundary_scalings(torch.tensor([tt]))
        assert got[0].item() == pytest.approx(want[0], rel=1e-5, abs=1e-9) and got[1].item() == pytest.approx(want[1], rel=1e-5)
