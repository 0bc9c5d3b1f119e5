"""`bksdm distill` and `bksdm cache` for SD3 and Flux teachers (flow matching, transformer students) on tiny random
pipelines: compress -> distill (every term, exact resume, EMA) -> generate -> load with the family's pipeline class;
the VAE's shift; cache equal to the live path and refused for another teacher; one-line refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from bksdm.cli import main
from bksdm.recipes.distill import DistillRecipe
from tests.conftest import FAST, assert_cached_equals_live, distill_cfg, one_line_error
from tests.test_flow import tiny_flux, tiny_sd3

KINDS = ("sd3", "sd3-no-t5", "flux", "flux-schnell")
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


def dit_teacher(kind: str):
    """A tiny pipeline of ``kind``: SD3 (3 joint blocks) with or without T5, Flux with or without guidance embedding
    (2 double and 3 single blocks, so that bk-small removes blocks of both lists)."""
    if kind.startswith("sd3"):
        return tiny_sd3(t5=kind == "sd3")
    from diffusers import FluxPipeline, FluxTransformer2DModel

    pipe = tiny_flux(guidance=kind == "flux")
    torch.manual_seed(1)
    bigger = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=3,
                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                    pooled_projection_dim=16, guidance_embeds=kind == "flux", axes_dims_rope=[2, 2, 4])
    return FluxPipeline(**{**pipe.components, "transformer": bigger.eval()})


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Teacher folders and their bk-small students (through `bksdm compress`), by kind."""
    root = tmp_path_factory.mktemp("dit_teachers")
    out = {}
    for kind in KINDS:
        dit_teacher(kind).save_pretrained(root / kind)
        assert main(["compress", "--teacher", str(root / kind), "--student", "bk-small", "--out", str(root / f"{kind}-s")]) == 0
        out[kind] = (root / kind, root / f"{kind}-s")
    return out


def _cfg(teachers, kind: str, out: Path, **kw):
    teacher, student = teachers[kind]
    return distill_cfg(teacher, out, student=str(student), **kw)


def _losses(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "logs" / "losses.csv")))


@pytest.mark.parametrize("kind", KINDS)
def test_distill_every_term_resumes_exactly_and_final_loads(kind, teachers, tmp_path):
    """compress -> distill: every term logged (cfg_kd where the family is guided with an unconditional pass), a
    run killed after one step and resumed equals an uninterrupted one (EMA, caption dropout and the flow draws
    included), OUT/final loads with the family's pipeline class unedited and generates."""
    import diffusers

    guided = kind.startswith("sd3")
    kw = dict(max_steps=2, checkpoint_every=1, caption_dropout=0.5, lambda_cfg=0.5 if guided else 0.0,
              weighting="none" if guided else "cosmap", lr=1e-3)
    full = DistillRecipe(_cfg(teachers, kind, tmp_path / "a", **kw, sample_prompts=["a red circle"], sample_steps=2)).setup()
    assert full.family.backbone == "transformer" and full.objective.name == "flow"
    full.train()
    part = DistillRecipe(_cfg(teachers, kind, tmp_path / "b", **kw)).setup()
    part.cfg.max_steps = 1  # "killed" after step 1 (the schedule was built for 2)
    part.train()
    resumed = DistillRecipe(_cfg(teachers, kind, tmp_path / "b", **kw, resume="latest")).setup()
    assert resumed.step == 1
    resumed.train()
    a, b = full.final_model().state_dict(), resumed.final_model().state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    rows = _losses(tmp_path / "a")
    assert [r["loss"] for r in rows] == [r["loss"] for r in _losses(tmp_path / "b")]
    for term in ("task", "out_kd", "feat_kd") + (("cfg_kd",) if guided else ()):
        assert all(float(r[term]) > 0 for r in rows), term
    final = tmp_path / "a" / "final"
    assert (final / "transformer" / "config.json").is_file() and not (final / "unet").exists()
    family = kind.split("-")[0]
    # diffusers loads a pipeline saved without T5 (the teacher too) only when told: text_encoder_3=None
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3-no-t5" else {}
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(final, **no_t5)
    student_cfg = json.loads((teachers[kind][1] / "transformer" / "config.json").read_text())
    blocks = lambda c: c["num_layers"] + c.get("num_single_layers", 0)  # noqa: E731
    assert blocks(pipe.transformer.config) == blocks(student_cfg) < blocks(full.teacher.unet.config)
    record = json.loads((final / "bksdm.json").read_text())
    assert record["backbone"] == full.teacher_config["_class_name"] and record["distill"]["steps"] == 2
    card = (final / "README.md").read_text()
    assert "Transformer parameters" in card and "removed: [1]" in card and (final / "samples.png").is_file()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert main(["generate", "--model", str(final), "--prompts", str(prompts), "--out", str(tmp_path / "g"), "--steps", "2",
                 "--resolution", "32", "--save-size", "16", "--dtype", "fp32", "--lossless"]) == 0
    assert len(list((tmp_path / "g" / "images").iterdir())) == 1


def test_latents_are_the_sd3_scripts_shifted_and_scaled_latents(teachers, tmp_path):
    """Trainer.encode: ((mean + std * eps) - shift_factor) * scaling_factor, as diffusers' train_dreambooth_sd3.py
    computes ``(latent_dist.sample() - shift) * scale`` (the tiny VAE shifts by 0.0609)."""
    from bksdm.distill.loader import micro_batches
    from bksdm.models import encode_pixels

    r = DistillRecipe(_cfg(teachers, "sd3", tmp_path / "r")).setup()
    shift, scale = r.vae.config.shift_factor, r.vae.config.scaling_factor
    assert shift != 0 and scale != 1
    batch = next(micro_batches(r.source, 0, False, 32, 4, 0, 1, 0))
    latents, _ = r.encode(batch, torch.Generator().manual_seed(3))
    with torch.no_grad():
        dist = encode_pixels(r.vae, batch["pixels"])
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(latents, (dist.mean + dist.std * eps - shift) * scale, rtol=0, atol=1e-6)
    # the deterministic part is the script's (mean - shift) * scale
    torch.testing.assert_close(latents - dist.std * eps * scale, (dist.mean - shift) * scale, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd3", "sd3-no-t5", "flux"])
def test_cached_equals_live(kind, teachers, tmp_path):
    from safetensors.torch import load_file

    teacher, _ = teachers[kind]
    assert main(["cache", "--teacher", str(teacher), "--data", "mini-world:8", "--out", str(tmp_path / "c"),
                 "--resolution", "32", "--dtype", "fp32"]) == 0
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    family = kind.split("-")[0]
    assert index["family"] == family
    assert index["family_meta"] == ({"max_sequence_length": 256, "t5": kind == "sd3"} if family == "sd3"
                                    else {"max_sequence_length": 512})
    emb = load_file(str(tmp_path / "c" / "shard-00000.safetensors"))["emb"]
    # SD3 without T5 stores only the CLIP tokens (its T5 part is zeros); with T5 and Flux every T5 position
    assert emb.shape[1] == {"sd3": 10 + 256, "sd3-no-t5": 10, "flux": 512}[kind]
    kw = dict(random_flip=True, caption_dropout=0.5, lambda_cfg=0.5 if family == "sd3" else 0.0)
    plain = DistillRecipe(_cfg(teachers, kind, tmp_path / "u", data="mini-world:8", **kw)).setup()
    cached = DistillRecipe(_cfg(teachers, kind, tmp_path / "k", cache=str(tmp_path / "c"), **kw)).setup()
    assert_cached_equals_live(plain, cached)


def test_a_cache_of_another_teacher_is_refused(teachers, tmp_path, capsys):
    sd3, _ = teachers["sd3"]
    assert main(["cache", "--teacher", str(sd3), "--data", "mini-world:4", "--out", str(tmp_path / "c"),
                 "--resolution", "32"]) == 0
    capsys.readouterr()
    for kind, message in (("sd3-no-t5", "'t5': True"), ("flux", "built for a sd3 teacher")):
        teacher, student = teachers[kind]
        assert main(["distill", "--teacher", str(teacher), "--student", str(student), "--cache", str(tmp_path / "c"),
                     "--out", str(tmp_path / kind), *FAST]) == 2
        assert message in one_line_error(capsys)


def test_flow_options_have_one_source():
    from bksdm.config import BOUNDS
    from bksdm.distill.config import FLOW_OPTIONS, DistillConfig
    from bksdm.objectives import DENSITIES, WEIGHTINGS, FlowObjective

    assert BOUNDS["density"]["choices"] == DENSITIES and BOUNDS["weighting"]["choices"] == WEIGHTINGS
    assert all(getattr(DistillConfig(), k) == getattr(FlowObjective, k) for k in FLOW_OPTIONS)
    assert DistillConfig().flow_options() == {} and DistillConfig(density="mode").flow_options() == {"density": "mode"}


def test_refusals_are_one_line(teachers, tiny_teacher_dir, tmp_path, capsys):
    sd3, sd3_student = teachers["sd3"]
    flux, flux_student = teachers["flux"]
    data = ["--data", "mini-world:8", *FAST]
    cases = [
        (["distill", "--teacher", str(flux), "--student", str(flux_student), "--out", str(tmp_path / "o1"), "lambda_cfg=0.5", *data],
         "lambda_cfg distils classifier-free guidance"),
        (["distill", "--teacher", str(tiny_teacher_dir), "--out", str(tmp_path / "o2"), "density=uniform", *data],
         "apply to flow-matching teachers"),
        (["distill", "--teacher", str(sd3), "--student", str(sd3_student), "--out", str(tmp_path / "o3"),
          "timestep_bias=later", *data], "timestep_bias applies to DDPM teachers"),
        (["distill", "--teacher", str(sd3), "--student", str(sd3_student), "--out", str(tmp_path / "o4"),
          "feature_points=self_attn", *data], "transformer students use blocks"),
        (["lcm", "--model", str(sd3), "--out", str(tmp_path / "o5"), *data], "not supported by `bksdm lcm` yet"),
        (["export", str(sd3), "--out", str(tmp_path / "o6.safetensors")], "not supported by `bksdm export` yet"),
        (["compress", "--teacher", str(sd3), "--student", "auto", "--out", str(tmp_path / "o8")],
         "--student auto needs --budget"),
    ]
    cases.append((["dreambooth", "--model", str(flux), "--instance-dir", str(tmp_path), "--instance-prompt", "a sks circle",
                   "--no-with-prior", "--out", str(tmp_path / "o9"), "--mixed-precision", "no"],
                  "pass --no-train-text-encoder (or --config flux)"))  # the paper's defaults train the text encoder
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in one_line_error(capsys), argv
    # a side the packed latents cannot take (a factor-8 VAE: 24 px gives 3x3 latents) is refused before any work,
    # not met by a view error inside the model; only the VAE's config is read for it
    import shutil

    wide = tmp_path / "flux-vae8"
    shutil.copytree(flux, wide)
    vae_cfg = wide / "vae" / "config.json"
    vae_cfg.write_text(json.dumps({**json.loads(vae_cfg.read_text()), "block_out_channels": [4, 8, 8, 8]}))
    assert main(["distill", "--teacher", str(wide), "--student", str(flux_student), "--out", str(tmp_path / "o10"),
                 *data, "--resolution", "24"]) == 2
    assert "multiples of 16 px" in one_line_error(capsys) and not (tmp_path / "o10").exists()
    # --overwrite replaces an earlier run only once every setting is checked: a refused run leaves it whole
    earlier = tmp_path / "earlier"
    (earlier / "logs").mkdir(parents=True)
    (earlier / "config.json").write_text("{}")
    assert main(cases[0][0][:5] + ["--out", str(earlier), "--overwrite", *cases[0][0][7:]]) == 2
    assert "lambda_cfg distils" in one_line_error(capsys)
    assert (earlier / "config.json").read_text() == "{}" and (earlier / "logs").is_dir()


def test_the_readme_example_runs(tmp_path):
    """examples/tiny_flux_student.py (README, "Transformer students"): compress, inspect, cache, distill, generate."""
    import importlib.util

    path = Path(__file__).parents[1] / "examples" / "tiny_flux_student.py"
    spec = importlib.util.spec_from_file_location("tiny_flux_student", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    final = example.run(tmp_path, steps=2)
    assert (final / "transformer" / "config.json").is_file() and len(list((tmp_path / "images" / "images").iterdir())) == 2


def test_gradient_checkpointing_changes_nothing(teachers, tmp_path):
    """Checkpointed blocks run again in backward (their forward pre-hooks fire; torch's non-reentrant checkpoint
    stops recomputing before the block outputs, so the feature hooks do not): the weights equal a run without
    checkpointing. (Design note §6 feared recomputed features held through backward; today none are.)"""
    runs = []
    for gc in (False, True):
        r = DistillRecipe(_cfg(teachers, "flux", tmp_path / str(gc), max_steps=2, ema=False, gradient_checkpointing=gc)).setup()
        r.train()
        runs.append(r.final_model().state_dict())
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=0, atol=1e-6, msg=k)
