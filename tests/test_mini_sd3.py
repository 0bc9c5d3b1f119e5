"""The SD3-layout (MMDiT, flow matching) mini teacher: its pipeline builds and samples with diffusers'
``StableDiffusion3Pipeline`` on the world's space-to-depth VAE, `bksdm mini-teacher --config sd3` trains it (finite
loss, weights move, checksummed folder, EMA checkpoints, continuation), and the toolkit's commands take the result:
`bksdm generate` (32 px) and `bksdm compress --student bk-small`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bksdm.cli import main
from tests.conftest import one_line_error

PROMPTS = ["a small red circle at the top left", "a large blue square at the bottom right and a small green triangle at the top left"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run folder of `bksdm mini-teacher --config sd3`: 3 steps of batch 4 (lr raised so the fp16-saved weights
    visibly move during the 200-step warm-up), an EMA checkpoint at step 2."""
    out = tmp_path_factory.mktemp("sd3") / "run"
    assert main(["mini-teacher", "--config", "sd3", f"out={out}", "--steps", "3", "batch_size=4", "--log-every", "1",
                 "--save-every", "2", "lr=0.05"]) == 0
    return out


def _family(pipe):
    from bksdm.arch.flow_families import family_for

    return family_for(pipe.transformer.config, [n for n, c in pipe.components.items() if c is not None])


def test_mini_sd3_teacher_layout_and_latent_path():
    """8 joint blocks 128 wide over 64 image tokens, two CLIPs with projection, no T5, the world's VAE centred by its
    shift with SD3's shift_factor 0; the pipeline's own latent path (vae_scale_factor, decode) and a 32 px call."""
    from diffusers import StableDiffusion3Pipeline

    from bksdm.mini.teacher import SD3_TEACHER_TRANSFORMER, VAE_SHIFT, to_tensor
    from bksdm.mini.world import ShapesWorld
    from bksdm.recipes.mini_teacher import new_teacher

    pipe = new_teacher("sd3", seed=0)
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is None
    cfg = pipe.transformer.config
    assert (cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim, cfg.in_channels, cfg.patch_size) == (8, 128, 12, 2)
    assert cfg.joint_attention_dim == SD3_TEACHER_TRANSFORMER["text_width"] == 32 + 32
    assert sum(p.numel() for p in pipe.transformer.parameters()) == 4_663_088  # the number in SD3_TEACHER_TRANSFORMER's doc
    assert pipe.vae_scale_factor == 2 and pipe.vae.config.shift == VAE_SHIFT and pipe.vae.config.shift_factor == 0.0
    assert pipe.scheduler.config.shift == 1.6 and not pipe.scheduler.config.use_dynamic_shifting
    fam = _family(pipe)
    assert fam.name == "sd3" and not fam.t5 and fam.joint_attention_dim == 64
    images = to_tensor([ShapesWorld(seed=0).sample(i)[0] for i in range(2)])  # (2, 3, 32, 32) in [-1, 1]
    z = pipe.vae.encode(images).latent_dist.mode()
    assert z.shape == (2, 12, 16, 16) and abs(float(z.mean())) < 0.2  # centred
    decoded = pipe.vae.decode(z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample  # the pipeline's
    assert torch.allclose(decoded, images, atol=1e-5)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPTS[0], num_inference_steps=2, height=32, width=32, max_sequence_length=8, output_type="np").images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_dropped_captions_train_the_pipelines_negative_prompt():
    """A dropped caption's conditioning is what StableDiffusion3Pipeline guides with for "no prompt" (its
    negative_prompt "" through both CLIPs and T5's zeros); a kept one is the pipeline's prompt encoding."""
    from bksdm.recipes.mini_teacher import new_teacher, teacher_conditioning

    pipe = new_teacher("sd3", seed=1)
    fam = _family(pipe)
    parts = {n: getattr(pipe, n) for n in fam.text_components}
    with torch.no_grad():
        cond = teacher_conditioning(fam, parts, ["", PROMPTS[1]], 2)
        pos, neg, pos_pooled, neg_pooled = pipe.encode_prompt(PROMPTS[1], None, None, negative_prompt="",
                                                              do_classifier_free_guidance=True, device="cpu")
    assert cond["encoder_hidden_states"].shape == (2, 24 + 256, 64)  # CLIP tokens + the pipeline's 256 T5 zeros
    assert torch.equal(cond["encoder_hidden_states"][0], neg[0]) and torch.equal(cond["pooled_projections"][0], neg_pooled[0])
    # batch 2 against the pipeline's batch 1: equal up to float rounding
    assert torch.allclose(cond["encoder_hidden_states"][1], pos[0], atol=1e-5)
    assert torch.allclose(cond["pooled_projections"][1], pos_pooled[0], atol=1e-5)


def test_mini_teacher_sd3_trains_a_checksummed_flow_matching_pipeline(trained):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from bksdm.mini.teacher import load_teacher
    from bksdm.recipes.mini_teacher import new_teacher

    info = json.loads((trained / "final" / "training.json").read_text())
    assert info["family"] == "sd3" and info["prediction"] == "flow" and info["steps"] == 3
    assert all(np.isfinite(r["loss"]) for r in info["history"]) and len(info["history"]) == 3
    assert (trained / "step-2" / "checksums.json").is_file()
    pipe = load_teacher(trained / "final")  # verifies every weight file's sha256
    assert isinstance(pipe, StableDiffusion3Pipeline) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert "prediction_type" not in pipe.scheduler.config  # a flow scheduler has no target setting
    init = new_teacher("sd3", seed=0)  # the run's initial weights (seed 0)
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        before, after = getattr(init, name).state_dict(), getattr(pipe, name).state_dict()
        moved = [k for k in before if not torch.equal(before[k].half().float(), after[k].float())]
        assert len(moved) > len(before) // 2, name
    # and with diffusers alone, as a user would load it: the VAE class's module imported, T5's absence passed on
    import bksdm.mini.model  # noqa: F401

    pipe = StableDiffusion3Pipeline.from_pretrained(trained / "final", text_encoder_3=None, tokenizer_3=None)
    assert pipe.transformer.config.num_layers == 8


def test_generate_samples_the_mini_sd3_teacher_at_32px(trained, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    assert main(["generate", "--model", str(trained / "final"), "--prompts", str(prompts), "--out", str(tmp_path / "g"),
                 "--steps", "2", "--resolution", "32", "--dtype", "fp32", "--lossless"]) == 0
    images = sorted((tmp_path / "g" / "images").iterdir())
    assert len(images) == 2 and all(Image.open(p).size == (32, 32) for p in images)


def test_compress_takes_the_mini_sd3_teacher(trained, tmp_path):
    """`bksdm compress --student bk-small` on the 8-block teacher keeps blocks 0, 1, 6, 7 (the middle half removed; the
    last block, which has no context output, stays last) and writes a folder StableDiffusion3Pipeline loads."""
    from diffusers import StableDiffusion3Pipeline

    import bksdm.mini.model  # noqa: F401  (the VAE class named in model_index.json)

    out = tmp_path / "student"
    assert main(["compress", "--teacher", str(trained / "final"), "--student", "bk-small", "--out", str(out)]) == 0
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None, "dtype": torch.float32}  # teacher parts ship in fp16
    student = StableDiffusion3Pipeline.from_pretrained(out, **no_t5)
    teacher = StableDiffusion3Pipeline.from_pretrained(trained / "final", **no_t5)
    assert student.transformer.config.num_layers == 4
    for s, t in zip((0, 1, 2, 3), (0, 1, 6, 7)):
        ss, ts = student.transformer.transformer_blocks[s].state_dict(), teacher.transformer.transformer_blocks[t].state_dict()
        assert ss.keys() == ts.keys() and all(torch.equal(ss[k], ts[k]) for k in ss)
    student.set_progress_bar_config(disable=True)
    img = student(PROMPTS[0], num_inference_steps=2, height=32, width=32, max_sequence_length=8, output_type="np").images
    assert img.shape == (1, 32, 32, 3)


def test_mini_teacher_sd3_continues_from_its_own_folder(trained, tmp_path):
    """A continuation with the cosine schedule (how the shipped teacher's last stage ran): the lr each step used is
    logged, starts at lr (runs under 10 steps have no warm-up) and falls as diffusers' cosine schedule says."""
    assert main(["mini-teacher", "--config", "sd3", f"out={tmp_path / 'more'}", f"init_from={trained / 'final'}",
                 "--steps", "4", "batch_size=2", "--log-every", "1", "--save-every", "0", "start_index=100",
                 "lr=0.001", "lr_schedule=cosine"]) == 0
    info = json.loads((tmp_path / "more" / "final" / "training.json").read_text())
    assert info["family"] == "sd3" and info["lr_schedule"] == "cosine" and np.isfinite(info["history"][0]["loss"])
    cosine = [1e-3 * 0.5 * (1 + np.cos(np.pi * s / 4)) for s in range(4)]
    np.testing.assert_allclose([h["lr"] for h in info["history"]], cosine, rtol=1e-6)


def test_mini_teacher_sd3_faults(trained, tmp_path, capsys):
    from bksdm.mini.teacher import ASSET, SD3_ASSET, teacher_path

    assert main(["mini-teacher", "--config", "sd3", f"out={tmp_path / 'a'}", "prediction=epsilon"]) == 2
    assert "family sd3 learns flow matching's eps - x0" in one_line_error(capsys)
    assert main(["mini-teacher", "--config", "sd3", f"out={tmp_path / 'b'}", f"init_from={ASSET}", "--steps", "1"]) == 2
    assert "is not a sd3-layout teacher" in one_line_error(capsys)
    assert main(["mini-teacher", f"out={tmp_path / 'c'}", f"init_from={trained / 'final'}", "--steps", "1"]) == 2
    assert "is not a sd-layout teacher" in one_line_error(capsys)
    assert main(["mini-teacher", "--config", "sd3", f"out={tmp_path / 'd'}", f"init_from={trained / 'final'}",
                 "fresh_text=2"]) == 2
    assert "a sd3 teacher has two" in one_line_error(capsys)
    assert main(["mini-teacher", "--config", "sd3", f"out={tmp_path / 'e'}", "lr_schedule=linear"]) == 2
    assert "choose constant or cosine" in one_line_error(capsys)
    assert not any((tmp_path / n / "final").exists() for n in "abcde")
    with pytest.raises(Exception, match="family=sd3"):  # a folder without checksums says how to train one
        teacher_path(tmp_path / "none", family="sd3")
    assert teacher_path(family="sd3") == SD3_ASSET  # the shipped one verifies


def test_shipped_sd3_teacher_loads_checks_its_checksum_and_draws_the_prompts(tmp_path):
    """The shipped SD3-layout teacher (docs/mini-world.md, "SD3 layout": fidelity 0.900 on 1,000 prompts): a
    StableDiffusion3Pipeline of 8 joint blocks without T5, under 10 MiB, a flipped byte refused; and its pictures of
    16 held-out prompts (the pipeline's default guidance 7.0, 25 steps) scored by the world's classifier: a fidelity
    far from the 0.0 of an untrained or broken model (0.9 expected; 0.6 leaves room for 16 samples' noise)."""
    import shutil

    from bksdm.mini.metrics import fidelity
    from bksdm.mini.teacher import SD3_ASSET, load_teacher, teacher_path
    from bksdm.mini.world import ShapesWorld

    pipe = load_teacher(family="sd3")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None
    assert len(pipe.transformer.transformer_blocks) == 8
    assert sum(f.stat().st_size for f in SD3_ASSET.rglob("*.safetensors")) < 10 * 2**20
    broken = tmp_path / "teacher"
    shutil.copytree(SD3_ASSET, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(Exception, match="sha256 mismatch"):
        teacher_path(broken, family="sd3")
    prompts = ShapesWorld(seed=0).prompts(16)
    images = pipe(prompts, num_inference_steps=25, height=32, width=32,
                  generator=torch.Generator().manual_seed(0)).images
    assert fidelity(images, prompts) >= 0.6


def test_shipped_sd3_config_is_the_recipe_with_its_family():
    import yaml

    from bksdm.config import load_yaml_config
    from bksdm.mini.config import TeacherConfig

    shipped = Path(__file__).parent.parent / "src" / "bksdm" / "configs" / "mini_teacher_sd3.yaml"
    data = yaml.safe_load(shipped.read_text())
    assert set(data) == set(TeacherConfig.fields())  # every key written out, none unknown
    cfg = load_yaml_config(TeacherConfig, "sd3", "mini_teacher")
    assert cfg.family == "sd3" and cfg.target() == "flow" and cfg.to_dict() == {**TeacherConfig().to_dict(), **data}
    assert all("#" in line for line in shipped.read_text().splitlines() if line and not line.startswith("#"))
