"""SDXL students: the family (two text encoders, pooled embedding, size conditioning), transformer-depth specs,
self-attention feature KD, and compress -> distill -> generate -> LoRA DreamBooth -> diffusers on a tiny
SDXL-layout pipeline. Full-size SDXL only on the meta device."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bksdm.arch import SDXL_SPECS, BlockSpec, derive, init_student_from_teacher, load_spec
from bksdm.arch.derive import meta_unet
from bksdm.arch.families import family_of, family_unet_config
from bksdm.cli import main
from bksdm.errors import UserError
from tests.conftest import distill_cfg, one_line_error

# the tiny teacher's depths are 1 / 2 / 3: this spec keeps one layer of stage 1 (its second), layers 0 and 2 of
# the innermost stage and of the mid-block (moved: the student's layer 1 is the teacher's layer 2), and on the up
# path 0 and 2 of the innermost stage's blocks and layer 1 of the next
SPEC = {"name": "xl-tiny", "down": [[0], [0], [0]], "mid": True, "up": [[0, 2], [0, 2], [0, 2]],
        "depth": {"down": [None, [1], [0, 2]], "mid": [0, 2], "up": [[0, 2], [1], None]}}


def _count(cfg: dict) -> int:
    return sum(p.numel() for p in meta_unet(cfg).parameters())


def test_full_size_sdxl_and_published_students_count_exactly():
    cfg = family_unet_config("sdxl")
    assert _count(cfg) == 2_567_463_684  # SDXL-base 1.0's U-Net
    counts = {n: _count(derive(cfg, s, with_keys=False).student_config) for n, s in SDXL_SPECS.items()}
    # KOALA (arXiv 2312.04005): U-Nets of 1,161M and 782M parameters (millions cut, not rounded: 782.8M is "782M")
    assert counts["koala-1b"] // 10**6 == 1161 and counts["koala-700m"] // 10**6 == 782
    assert counts["bk-base"] > counts["bk-small"] > counts["koala-1b"] > counts["koala-700m"]
    # SSD-1B (arXiv 2401.02677: a "1.3B parameter UNet"): our spec yields exactly the layout public loaders build
    # SSD-1B's U-Net with: per-block depths, and a mid-block without attention
    public = {**cfg, "mid_block_type": "UNetMidBlock2D", "transformer_layers_per_block": [[1], [2, 2], [4, 4]],
              "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], 1]}
    ours = derive(cfg, SDXL_SPECS["ssd-1b"], with_keys=False).student_config
    assert {k: v.shape for k, v in meta_unet(ours).state_dict().items()} == \
        {k: v.shape for k, v in meta_unet(public).state_dict().items()}
    assert counts["ssd-1b"] == 1_331_334_404 and counts["ssd-1b"] // 10**8 == 13


def test_profile_arch_sdxl_counts_both_text_encoders():
    from bksdm.profile import profile_models

    rec = profile_models("sdxl", ["koala-700m"], [], latency=False)
    assert rec[0]["unet_params"] == 2_567_463_684
    assert rec[0]["text_encoder_params"] == 123_060_480 + 694_659_840  # CLIP ViT-L/14 + OpenCLIP bigG with projection
    assert rec[1]["unet_params"] == 782_822_724
    assert rec[0]["unet_gmacs"] > rec[1]["unet_gmacs"] > 0


def test_depth_spec_maps_moved_layers_and_pairs_self_attention(tiny_sdxl_dir):
    from diffusers import UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir / "unet")
    d = derive(dict(teacher.config), BlockSpec.from_dict(SPEC))
    assert d.student_config["transformer_layers_per_block"] == [1, 1, 2]
    student = init_student_from_teacher(teacher, d)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    assert set(d.key_map) == set(s_sd)
    for key, src in d.key_map.items():
        assert torch.equal(s_sd[key], t_sd[src]), key
    w = "attentions.0.transformer_blocks.{}.attn1.to_q.weight"
    assert d.key_map["down_blocks.1." + w.format(0)] == "down_blocks.1." + w.format(1)
    assert d.key_map["mid_block." + w.format(1)] == "mid_block." + w.format(2)
    assert d.key_map["up_blocks.0." + w.format(1)] == "up_blocks.0." + w.format(2)
    assert ("mid_block.attentions.0.transformer_blocks.2.attn1", "mid_block.attentions.0.transformer_blocks.1.attn1") in d.attn_pairs
    assert len(d.attn_pairs) == 1 + 2 + 2 + 2 * 2 + 2 * 1  # down 1+2, mid 2, up: two blocks x 2, two blocks x 1
    modules = dict(student.named_modules())
    assert all(s in modules for _, s in d.attn_pairs)


@pytest.mark.parametrize("depth,message", [
    ({"down": [None, [2], None]}, "list layers of 0..1"),
    ({"down": [[0], None, None]}, "has no attention blocks"),
    ({"down": [None, None, [0]], "mid": [0, 1, 2]}, "keeps 3 mid-block layers"),
])
def test_bad_depth_specs_are_one_line(tiny_sdxl_dir, depth, message):
    cfg = json.loads((tiny_sdxl_dir / "unet" / "config.json").read_text())
    with pytest.raises(UserError, match=message):
        derive(cfg, BlockSpec.from_dict({**SPEC, "depth": depth}))


def test_mid_block_without_attention_keeps_its_resnets(tiny_sdxl_dir):
    from diffusers import UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir / "unet")
    spec = BlockSpec.from_dict({**SPEC, "mid": "resnets", "depth": {**SPEC["depth"], "mid": None}})
    d = derive(dict(teacher.config), spec)
    student = init_student_from_teacher(teacher, d)
    assert d.student_config["mid_block_type"] == "UNetMidBlock2D"
    assert not any(k.startswith("mid_block.attentions") for k in student.state_dict())
    t_sd = teacher.state_dict()
    for key, value in student.state_dict().items():
        if key.startswith("mid_block"):
            assert key.startswith("mid_block.resnets") and torch.equal(value, t_sd[key]), key
    assert not any(p[1].startswith("mid_block") for p in d.attn_pairs)
    with pytest.raises(UserError, match="must be true, false or resnets"):
        BlockSpec.from_dict({**SPEC, "mid": "attention"})


def test_builtin_names_follow_the_teacher():
    sd, xl = family_unet_config("sd-v1"), family_unet_config("sdxl")
    assert len(load_spec("bk-small", xl).down) == 3 and len(load_spec("bk-small", sd).down) == 4
    with pytest.raises(UserError, match="built-in spec for SDXL"):
        load_spec("koala-1b", sd)
    with pytest.raises(UserError, match="unknown student 'bk-tiny'.*koala-700m"):
        load_spec("bk-tiny", xl)  # SDXL's innermost stage is wider than the one before: no bk-tiny


def test_conditioning_matches_the_sdxl_pipeline(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    family = family_of(pipe.unet.config)
    texts = ["a red circle", "a blue square at the top"]
    cond = family.encode_prompt(pipe.components, texts, "cpu")
    embeds, _, pooled, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["text_embeds"], pooled, rtol=0, atol=0)
    ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, pipe.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(family.added_conditioning(2, 32, "cpu")["time_ids"], ids.expand(2, 6))
    empty = family.unconditional(pipe.components, "cpu", {"force_zeros_for_empty_prompt": True})
    assert all(torch.count_nonzero(v) == 0 for v in empty.values())  # what the pipeline passes as "no prompt"


def _xl_cfg(teacher: Path, student: Path, out: Path, **kw):
    return distill_cfg(teacher, out, student=str(student), **kw)


@pytest.fixture(scope="module")
def xl_student(tiny_sdxl_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("xl")
    (path / "spec.json").write_text(json.dumps(SPEC))
    assert main(["compress", "--teacher", str(tiny_sdxl_dir), "--student", str(path / "spec.json"), "--out",
                 str(path / "student")]) == 0
    return path / "student"


def test_distill_self_attention_kd_resumes_exactly(tiny_sdxl_dir, xl_student, tmp_path):
    from bksdm.recipes.distill import DistillRecipe

    kw = dict(feature_points="self_attn", grad_accum=2, checkpoint_every=2, lambda_cfg=0.5, cfg_fraction=0.5,
              caption_dropout=0.5)
    full = DistillRecipe(_xl_cfg(tiny_sdxl_dir, xl_student, tmp_path / "a", **kw)).setup()
    assert full.s_hooks.names == [s for _, s in full.derivation.attn_pairs]
    full.train()
    part = DistillRecipe(_xl_cfg(tiny_sdxl_dir, xl_student, tmp_path / "b", **kw)).setup()
    part.cfg.max_steps = 2
    part.train()
    resumed = DistillRecipe(_xl_cfg(tiny_sdxl_dir, xl_student, tmp_path / "b", resume="latest", **kw)).setup()
    resumed.train()
    a, b = full.final_unet().state_dict(), resumed.final_unet().state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    rows = list(csv.DictReader(open(tmp_path / "a" / "logs" / "losses.csv")))
    assert [r["loss"] for r in rows] == [r["loss"] for r in csv.DictReader(open(tmp_path / "b" / "logs" / "losses.csv"))]
    assert all(float(r[k]) > 0 for r in rows for k in ("task", "out_kd", "feat_kd", "cfg_kd"))
    assert all(torch.count_nonzero(v) == 0 for v in full.empty_cond.values())  # SDXL's unconditional input


def test_cached_equals_uncached(tiny_sdxl_dir, xl_student, tmp_path):
    from bksdm.distill.loader import micro_batches
    from bksdm.recipes.distill import DistillRecipe

    assert main(["cache", "--teacher", str(tiny_sdxl_dir), "--data", "mini-world:8", "--out", str(tmp_path / "c"),
                 "--resolution", "32", "--dtype", "fp32"]) == 0
    plain = DistillRecipe(_xl_cfg(tiny_sdxl_dir, xl_student, tmp_path / "u", data="mini-world:8")).setup()
    cached = DistillRecipe(_xl_cfg(tiny_sdxl_dir, xl_student, tmp_path / "k", cache=str(tmp_path / "c"))).setup()
    b1 = next(micro_batches(plain.source, 7, False, 32, 4, 0, 1, 0))
    b2 = next(micro_batches(cached.source, 7, False, 32, 4, 0, 1, 0))
    assert set(b2) >= {"emb", "pooled"}
    l1, l2 = plain.loss_step(b1, torch.Generator().manual_seed(0)), cached.loss_step(b2, torch.Generator().manual_seed(0))
    for k in l1:
        torch.testing.assert_close(l1[k], l2[k], rtol=1e-4, atol=1e-6, msg=k)


def test_generate_lora_dreambooth_and_diffusers_load(xl_student, tmp_path, metric_home):
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    from bksdm.recipes.evaluate import evaluate

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square at the top\na green triangle\n")
    for bs in (1, 3):
        assert main(["generate", "--model", str(xl_student), "--prompts", str(prompts), "--out", str(tmp_path / f"g{bs}"),
                     "--steps", "2", "--scheduler", "euler", "--batch-size", str(bs), "--lossless"]) == 0
    for name in ("00000.png", "00002.png"):  # an image does not depend on the batch it was drawn in
        a, b = (Image.open(tmp_path / f"g{bs}" / "images" / name) for bs in (1, 3))
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()
        assert diff <= 1, (name, diff)  # fp rounding of batched kernels at most flips one 8-bit level
    res = evaluate(tmp_path / "g1" / "images", prompts, ["clip"], clip_name="bksdm-tiny-clip",
                   clip_pretrained=str(metric_home / "tiny-clip.pt"))
    assert res["images"] == 3 and -1 <= res["clip"] <= 1
    subj = tmp_path / "subj"
    subj.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (200, 40 * i, 10)).save(subj / f"{i}.png")
    assert main(["dreambooth", "--model", str(xl_student), "--instance-dir", str(subj), "--instance-prompt", "a red square",
                 "--class-prompt", "a square", "--num-class-images", "2", "--class-steps", "2", "--resolution", "32",
                 "--out", str(tmp_path / "db"), "--max-steps", "2", "--batch-size", "1", "--lora",
                 "--mixed-precision", "no"]) == 0
    lora = tmp_path / "db" / "final" / "pytorch_lora_weights.safetensors"
    assert main(["generate", "--model", str(xl_student), "--lora", str(lora), "--prompts", str(prompts), "--out",
                 str(tmp_path / "gl"), "--steps", "2", "--scheduler", "euler", "--lossless"]) == 0
    plain = Image.open(tmp_path / "g1" / "images" / "00000.png")
    tuned = Image.open(tmp_path / "gl" / "images" / "00000.png")
    assert (np.asarray(plain) != np.asarray(tuned)).any()  # the adapter was applied
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_student)  # no edits: plain diffusers
    pipe.load_lora_weights(lora.parent)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red square", num_inference_steps=2, height=32, width=32).images[0].size == (32, 32)


def test_inspect_shows_cut_transformer_layers(xl_student, capsys):
    assert main(["inspect", str(xl_student)]) == 0
    out = capsys.readouterr().out
    assert "| mid_block | 3 -> 3 (transformer layers 3 -> 2) |" in out  # the mid-block keeps layers 0 and 2 of 3
    assert "| up_blocks.0 | 6 -> 4 (transformer layers 9 -> 4) |" in out
    card = (xl_student / "README.md").read_text()  # the model card names the cut layers and the family
    assert "transformer layers kept per stage (down, mid, up): [null, [1], [0, 2]], [0, 2]" in card
    assert "- stable-diffusion-xl" in card


def test_sdxl_faults_are_one_line(tiny_sdxl_dir, xl_student, tmp_path, capsys):
    # koala-1b keeps six of the innermost stage's layers; the tiny teacher has three
    assert main(["compress", "--teacher", str(tiny_sdxl_dir), "--student", "koala-1b", "--out", str(tmp_path / "k")]) == 2
    assert "list layers of 0..2" in one_line_error(capsys)
    assert not (tmp_path / "k").exists()
    assert main(["distill", "--teacher", str(tiny_sdxl_dir), "--student", str(xl_student), "--out", str(tmp_path / "d"),
                 "feature_points=attention"]) == 2
    assert "feature_points" in one_line_error(capsys)
    assert main(["export", str(xl_student), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "OpenCLIP second text encoder" in one_line_error(capsys) and not (tmp_path / "x.safetensors").exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**SPEC, "depth": {"down": [None, None]}}))
    assert main(["compress", "--teacher", str(tiny_sdxl_dir), "--student", str(bad), "--out", str(tmp_path / "b")]) == 2
    assert "depth down needs one entry per stage (3)" in one_line_error(capsys)


def test_size_conditioning_follows_the_picture(tiny_sdxl_dir, xl_student, tmp_path):
    from PIL import Image

    from bksdm.distill.data import size_ids
    from bksdm.distill.loader import micro_batches
    from bksdm.recipes.distill import DistillRecipe

    # a 48x32 picture at 32 px: no resize, centre crop 8 px from the left (as diffusers' SDXL training script)
    assert size_ids((48, 32), 32).tolist() == [32, 48, 0, 8, 32, 32]
    assert size_ids((100, 50), 32).tolist() == [50, 100, 0, (64 - 32) // 2, 32, 32]  # resized to 64x32 first
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (48 + 8 * i, 32), (40 * i, 90, 200)).save(folder / f"{i}.png")
    (folder / "metadata.csv").write_text("file_name,text\n" + "".join(f"{i}.png,a blue square\n" for i in range(4)))
    r = DistillRecipe(_xl_cfg(tiny_sdxl_dir, xl_student, tmp_path / "s", data=str(folder))).setup()
    batch = next(micro_batches(r.source, 0, False, 32, 4, 0, 1, 0))
    _, cond = r.encode(batch, torch.Generator().manual_seed(0))
    assert sorted(cond["time_ids"][:, 1].tolist()) == [48, 56, 64, 72]  # each picture's own width
    torch.testing.assert_close(cond["time_ids"], batch["size_ids"])


def test_lcm_on_an_sdxl_student(tiny_sdxl_dir, xl_student, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    from bksdm.lcm.config import LCMConfig
    from bksdm.recipes.lcm import LCMRecipe

    cfg = LCMConfig().update(dict(model=str(xl_student), teacher=str(tiny_sdxl_dir), data="mini-world:8",
                                  out=str(tmp_path / "l"), resolution=32, batch_size=2, max_steps=2, mixed_precision="no",
                                  num_workers=0, report_to="none", gradient_checkpointing=False, time_cond_proj_dim=16), "test")
    r = LCMRecipe(cfg).setup()
    last = r.train()
    assert set(last) >= {"loss", "mse"} and last["loss"] > 0
    assert all(torch.count_nonzero(v) == 0 for v in r.empty_cond.values())  # the teacher's guidance: SDXL's zeros
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "l" / "final")
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim == 16
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=2, guidance_scale=4.0, height=32, width=32).images[0].size == (32, 32)


def test_mini_teacher_recipe_trains_an_sdxl_layout_teacher(tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    import bksdm.mini.model  # noqa: F401  (the world's VAE class, named in the folder's model_index.json)
    from bksdm.mini.config import TeacherConfig
    from bksdm.recipes import mini_teacher

    seen = []
    real = mini_teacher.teacher_conditioning

    def spy(family, parts, texts, batch):
        cond = real(family, parts, texts, batch)
        seen.append((list(texts), {k: v.detach().clone() for k, v in cond.items()}))
        return cond

    monkeypatch.setattr(mini_teacher, "teacher_conditioning", spy)
    cfg = TeacherConfig(out=str(tmp_path / "t"), steps=3, batch_size=8, log_every=1, save_every=0, family="sdxl", seed=3)
    result = mini_teacher.train_teacher(cfg)
    assert result["final_loss"] == result["final_loss"]  # not NaN
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "t" / "final")
    assert pipe.unet.config.transformer_layers_per_block == [1, 2, 2] and pipe.unet.config.in_channels == 12
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    # a dropped caption trains the all-zeros input SDXL pipelines guide with; the others their prompt's encoding
    dropped = [(i, cond) for texts, cond in seen for i, text in enumerate(texts) if text == ""]
    kept = [(i, cond) for texts, cond in seen for i, text in enumerate(texts) if text != ""]
    assert dropped and kept  # seed 3 drops some of the 24 captions (10% each): both cases are checked
    for i, cond in dropped:
        assert torch.count_nonzero(cond["encoder_hidden_states"][i]) == 0 and torch.count_nonzero(cond["text_embeds"][i]) == 0
    assert all(torch.count_nonzero(cond["encoder_hidden_states"][i]) > 0 for i, cond in kept)
    assert all(cond["time_ids"].tolist()[0] == [32, 32, 0, 0, 32, 32] for _, cond in kept)


def test_mini_teacher_family_faults(tmp_path, capsys):
    from bksdm.mini.teacher import ASSET

    assert main(["mini-teacher", "--out", str(tmp_path / "a"), "family=sdxxl"]) == 2
    assert "family 'sdxxl' is not one of sd, sdxl" in one_line_error(capsys)
    assert main(["mini-teacher", "--out", str(tmp_path / "b"), "--init-from", str(ASSET), "family=sdxl", "--steps", "1"]) == 2
    assert "is not a sdxl-layout teacher" in one_line_error(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "final").exists()


def test_ablate_family_sdxl_compares_feature_points(tmp_path):
    """`bksdm ablate --family sdxl` on a (barely trained) SDXL-layout mini teacher: a KOALA-style student, the three
    rows, every metric measured, the spec recorded, resumable, and an SD ablation folder refused."""
    from bksdm.mini.config import TeacherConfig
    from bksdm.recipes.mini_ablate import SDXL_VARIANTS, ablate
    from bksdm.recipes.mini_teacher import train_teacher

    train_teacher(TeacherConfig(out=str(tmp_path / "t"), steps=1, batch_size=4, log_every=1, save_every=0, family="sdxl"))
    teacher = str(tmp_path / "t" / "final")
    out = tmp_path / "abl"
    assert main(["ablate", "--family", "sdxl", "--out", str(out), "--teacher", teacher, "--steps", "2", "--seeds", "0",
                 "--images", "4", "--gen-steps", "2"]) == 0
    rows = json.loads((out / "ablation.json").read_text())
    assert [r["variant"] for r in rows] == list(SDXL_VARIANTS) and {r["family"] for r in rows} == {"sdxl"}
    for r in rows:
        assert all(np.isfinite(r[m]) for m in ("heldout_mse", "teacher_mse", "fidelity", "mini_fid"))
    student = json.loads((out / "init" / "koala-mini" / "unet" / "config.json").read_text())
    assert student["transformer_layers_per_block"] == [1, 2, 1] and student["mid_block_type"] is None
    assert json.loads((out / "specs" / "koala-mini.json").read_text())["depth"]["down"] == [None, None, [0]]
    feat = {}
    for r in rows:
        run = next((out / "runs").glob(f"koala-mini-{r['variant'].replace(' ', '_')}-0"))
        feat[r["variant"]] = [float(x["feat_kd"] or 0) for x in csv.DictReader(open(run / "logs" / "losses.csv"))]
        recipe = json.loads((run / "config.json").read_text())
        assert recipe["feature_points"] == SDXL_VARIANTS[r["variant"]].get("feature_points", "blocks")
        assert (recipe["lambda_feat"] == 0) == (r["variant"] == "+ output KD") and recipe["lambda_cfg"] == 0
    assert feat["+ block feature KD"] != feat["+ self-attention feature KD"]  # different layers distilled
    md = (out / "ablation.md").read_text()
    assert "KOALA" in md and len([line for line in md.splitlines() if line.startswith("- koala-mini, ")]) == 15
    assert ablate(out, steps=2, seeds=(0,), images=4, teacher=teacher, gen_steps=2, family="sdxl") == rows  # resumed
    with pytest.raises(UserError, match="holds an ablation of family sdxl"):
        ablate(out, steps=2, seeds=(0,), images=4, family="sd")


def test_ablate_family_faults_are_one_line(tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(["ablate", "--family", "sdxl", "--guided", "--out", str(out)]) == 2
    assert "--guided adds a row to the SD ablation" in one_line_error(capsys)
    assert main(["ablate", "--family", "sdxl", "--teacher", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "no mini teacher at" in one_line_error(capsys)
    assert main(["ablate", "--family", "sdxxl", "--out", str(out)]) == 2
    assert "--family 'sdxxl' is not one of sd, sdxl" in one_line_error(capsys)
    assert not out.exists()  # nothing written before the inputs are checked


def test_shipped_sdxl_teacher_generates_at_the_pipeline_default_guidance():
    from diffusers import StableDiffusionXLPipeline

    from bksdm.generate import generate_images
    from bksdm.mini.teacher import SDXL_ASSET, load_teacher

    pipe = load_teacher(family="sdxl")  # verifies the checksums
    assert isinstance(pipe, StableDiffusionXLPipeline) and pipe.unet.config.transformer_layers_per_block == [1, 2, 2]
    assert sum(f.stat().st_size for f in SDXL_ASSET.rglob("*.safetensors")) < 10 * 2**20
    parts = {n: getattr(pipe, n) for n in ("unet", "vae", *family_of(pipe.unet.config).text_components)}

    def image(guidance):
        return np.asarray(generate_images(parts, pipe.scheduler, ["a large red circle at the top left"], [0], 2, guidance)[0])

    default, five, paper = image(None), image(5.0), image(7.5)
    assert np.array_equal(default, five) and not np.array_equal(default, paper)  # StableDiffusionXLPipeline's 5.0


def test_training_encodes_with_the_vae_in_fp32_where_its_config_asks(tiny_sdxl_dir, tmp_path):
    """SDXL's VAE gives NaN in float16 (its config says force_upcast): distill, lcm, cache and DreamBooth encode
    through models.load_text_side / encode_pixels, which keep it in float32 even inside a float16 autocast."""
    import json
    import shutil

    from bksdm.models import encode_pixels, load_text_side

    vae, _ = load_text_side(tiny_sdxl_dir, "cpu", torch.float16)
    assert vae.config.force_upcast and vae.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.float16):  # as a mixed-precision training step runs
        dist = encode_pixels(vae, torch.zeros(1, 3, 32, 32))
    assert dist.mean.dtype == torch.float32
    folder = tmp_path / "no-upcast"
    shutil.copytree(tiny_sdxl_dir, folder)
    cfg = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**cfg, "force_upcast": False}))
    assert load_text_side(folder, "cpu", torch.float16)[0].dtype == torch.float16  # a VAE that does not ask
    assert load_text_side(tiny_sdxl_dir, "cpu", torch.bfloat16)[0].dtype == torch.bfloat16  # bf16 does not overflow


def test_an_sdxl_kohya_lora_is_refused_on_a_student_not_misplaced(xl_student, tmp_path, capsys):
    """kohya numbers SDXL LoRA blocks the original way (input_blocks.4.1...); diffusers decodes that with the model's
    layout, which on a student names other teacher blocks: refused in one line instead of applied to wrong weights."""
    from safetensors.torch import save_file

    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(8, 4),
               "lora_unet_input_blocks_4_1_proj_in.alpha": torch.tensor(4.0)}, str(tmp_path / "k.safetensors"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle at the top left\n")
    assert main(["generate", "--model", str(xl_student), "--prompts", str(prompts), "--out", str(tmp_path / "g"),
                 "--lora", str(tmp_path / "k.safetensors"), "--steps", "1", "--save-size", "0"]) == 2
    assert "names SDXL's original blocks (kohya)" in one_line_error(capsys)
