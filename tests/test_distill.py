"""`bksdm distill` and `bksdm cache` on tiny models: learning, exact resume, cache equality, DDP, bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bksdm.cli import main
from tests.conftest import FAST, assert_cached_equals_live, distill_cfg, hf_image_dataset, one_line_error
from bksdm.distill.config import DistillConfig, load_config
from bksdm.recipes.distill import DistillRecipe

def _losses(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "logs" / "losses.csv")))


def test_shipped_yaml_equals_defaults():
    path = Path(__file__).parents[1] / "src" / "bksdm" / "configs" / "distill_paper.yaml"
    assert yaml.safe_load(path.read_text()) == DistillConfig().to_dict()
    assert load_config("paper") == DistillConfig()


def test_overfits_a_fixed_batch(tiny_teacher_dir, tmp_path):
    cfg = distill_cfg(tiny_teacher_dir, tmp_path / "run", data="mini-world:4", lr=2e-3, max_steps=150, ema=False)
    recipe = DistillRecipe(cfg).setup()
    from bksdm.distill.loader import micro_batches

    batch = next(micro_batches(recipe.source, 0, False, 32, 4, 0, 1, 0))
    start = {k: v.item() for k, v in recipe.loss_step(batch, torch.Generator().manual_seed(0)).items()}
    recipe.train()
    with torch.no_grad():
        end = {k: v.item() for k, v in recipe.loss_step(batch, torch.Generator().manual_seed(0)).items()}
    assert end["loss"] < 0.5 * start["loss"], (start, end)
    assert end["feat_kd"] < start["feat_kd"] and end["out_kd"] < start["out_kd"]


def test_killed_and_resumed_equals_uninterrupted(tiny_teacher_dir, tmp_path):
    # a decaying lr schedule and caption dropout too: both must continue where they stopped
    kw = dict(grad_accum=2, checkpoint_every=2, lr_scheduler="cosine", lr_warmup_steps=1, caption_dropout=0.5)
    full = DistillRecipe(distill_cfg(tiny_teacher_dir, tmp_path / "a", **kw)).setup()
    full.train()
    part = DistillRecipe(distill_cfg(tiny_teacher_dir, tmp_path / "b", **kw, max_steps=4)).setup()
    part.cfg.max_steps = 2  # "killed" after step 2 (the schedule was built for 4 steps)
    part.train()
    resumed = DistillRecipe(distill_cfg(tiny_teacher_dir, tmp_path / "b", **kw, resume="latest")).setup()
    assert resumed.step == 2
    resumed.train()
    a, b = full.final_unet().state_dict(), resumed.final_unet().state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert [r["loss"] for r in _losses(tmp_path / "a")] == [r["loss"] for r in _losses(tmp_path / "b")]
    lrs = [float(r["lr"]) for r in _losses(tmp_path / "a")]
    assert lrs == [float(r["lr"]) for r in _losses(tmp_path / "b")]
    assert lrs == pytest.approx([0, 5e-5, 3.75e-5, 1.25e-5])  # the lr each step used: 1 warm-up step, then cosine
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step-2", "step-4"]


@pytest.mark.parametrize("fraction,rows", [(1.0, 4), (0.5, 2)])
def test_guided_output_kd_matches_its_definition(tiny_teacher_dir, tmp_path, fraction, rows):
    from bksdm.distill.loader import micro_batches
    from bksdm.training import noisy_inputs

    r = DistillRecipe(distill_cfg(tiny_teacher_dir, tmp_path / "g", lambda_cfg=0.5, cfg_scale=4.0,
                                  cfg_fraction=fraction)).setup()
    batch = next(micro_batches(r.source, 0, False, 32, 4, 0, 1, 0))
    terms = r.loss_step(batch, torch.Generator().manual_seed(0))
    # recompute from the definition: u + g (c - u) for both networks, with the same draws
    gen = torch.Generator().manual_seed(0)
    latents, cond = r.encode(batch, gen)
    noisy, t, _ = noisy_inputs(r.noise_scheduler, latents, gen)
    empty = {k: v.expand(rows, *v.shape[1:]) for k, v in r._empty_prompt().items()}
    noisy, t, cond = noisy[:rows], t[:rows], {k: v[:rows] for k, v in cond.items()}
    with torch.no_grad():
        tc, tu = r.teacher(noisy, t, **cond).sample, r.teacher(noisy, t, **empty).sample
        sc, su = r.student(noisy, t, **cond).sample, r.student(noisy, t, **empty).sample
    want = torch.nn.functional.mse_loss(su + 4 * (sc - su), tu + 4 * (tc - tu))
    torch.testing.assert_close(terms["cfg_kd"].detach(), want, rtol=1e-5, atol=1e-7)
    total = terms["task"] + terms["out_kd"] + terms["feat_kd"] + 0.5 * terms["cfg_kd"]
    torch.testing.assert_close(terms["loss"], total)
    assert terms["cfg_kd"] > 0


def test_caption_dropout_uses_the_empty_prompt(tiny_teacher_dir, tmp_path):
    from bksdm.distill.loader import micro_batches
    from bksdm.models import load_components

    recipe = DistillRecipe(distill_cfg(tiny_teacher_dir, tmp_path / "d", caption_dropout=1.0)).setup()
    batch = next(micro_batches(recipe.source, 0, False, 32, 4, 0, 1, 0))
    _, cond = recipe.encode(batch, torch.Generator().manual_seed(0))
    parts = load_components(tiny_teacher_dir, ("tokenizer", "text_encoder"))
    with torch.no_grad():
        empty = recipe.family.encode_prompt(parts, [""] * 4, "cpu")["encoder_hidden_states"]
        full = recipe.family.encode_prompt(parts, batch["text"], "cpu")["encoder_hidden_states"]
    torch.testing.assert_close(cond["encoder_hidden_states"], empty)
    assert not torch.allclose(empty, full)  # the captions differ from the empty prompt: the check can fail


def test_cached_equals_uncached(tiny_teacher_dir, tmp_path):
    assert main(["cache", "--teacher", str(tiny_teacher_dir), "--data", "mini-world:8", "--out", str(tmp_path / "c"),
                 "--resolution", "32", "--dtype", "fp32"]) == 0
    kw = dict(random_flip=True, caption_dropout=0.5)  # the cached path drops captions the same way
    plain = DistillRecipe(distill_cfg(tiny_teacher_dir, tmp_path / "u", data="mini-world:8", **kw)).setup()
    cached = DistillRecipe(distill_cfg(tiny_teacher_dir, tmp_path / "k", cache=str(tmp_path / "c"), **kw)).setup()
    assert_cached_equals_live(plain, cached)


def test_corrupt_image_is_skipped_and_counted(tiny_teacher_dir, tmp_path):
    from bksdm.mini.world import ShapesWorld

    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(6):
        image, text, _ = ShapesWorld().sample(i)
        image.save(data / f"{i}.png")
        rows.append((f"{i}.png", text))
    (data / "2.png").write_bytes(b"not a png")
    with open(data / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file_name", "text"), *rows])
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(tiny_teacher_dir), "--data", str(data), "--out", str(out),
                 "--max-steps", "3", "--grad-accum", "1", *FAST]) == 0
    rows = _losses(out)
    assert len(rows) == 3 and int(rows[-1]["skipped"]) >= 1


@pytest.mark.slow
def test_two_process_run_logs_every_term(tiny_teacher_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # torchrun, as on a multi-CPU host (`accelerate launch --cpu` starts one process, whatever --num_processes says)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "bksdm.cli", "distill",
           "--teacher", str(tiny_teacher_dir),
           "--data", "mini-world:32", "--out", str(out), "--max-steps", "2", "--grad-accum", "1", *FAST]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _losses(out)
    assert len(rows) == 2 and all(float(r[k]) > 0 for r in rows for k in ("loss", "task", "out_kd", "feat_kd"))
    assert (out / "final" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())["processes"] == 2


def test_hooks_see_through_compile_wrapper(tiny_teacher_dir):
    from diffusers import UNet2DConditionModel

    from bksdm.distill.hooks import FeatureHooks

    unet = UNet2DConditionModel.from_pretrained(tiny_teacher_dir / "unet")
    wrapped = torch.compile(unet)  # an OptimizedModule whose names gain "_orig_mod."
    hooks = FeatureHooks(wrapped, ["down_blocks.0", "up_blocks.3"])
    unet(torch.randn(1, 12, 16, 16), 5, torch.randn(1, 4, 16))
    feats = hooks.pop()
    assert feats[0].shape == (1, 8, 8, 8) and feats[1].shape == (1, 8, 16, 16)


def test_final_pipeline_loads(tiny_teacher_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    r = DistillRecipe(distill_cfg(tiny_teacher_dir, tmp_path / "f", max_steps=1, sample_prompts=["a red circle at the top left"],
                           sample_steps=2)).setup()
    r.train()
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "f" / "final")
    assert pipe.unet.mid_block is None
    assert (tmp_path / "f" / "samples" / "step-1.png").is_file()


def test_errors(tiny_teacher_dir, tmp_path, capsys):
    base = ["distill", "--teacher", str(tiny_teacher_dir), "--out", str(tmp_path / "o"), *FAST]
    assert main(base + ["--data", "mini-world:8", "bogus_key=1"]) == 2
    assert "unknown key 'bogus_key'" in one_line_error(capsys)
    assert main(base + ["--data", str(tmp_path / "missing")]) == 2
    assert "does not exist" in one_line_error(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.csv").write_text("file_name,text\n")
    assert main(base + ["--data", str(empty)]) == 2
    assert "is empty" in one_line_error(capsys)
    # a student compressed from another teacher (different text width) does not match this one
    from bksdm.mini.model import build_pipeline, unet_config
    from tests.conftest import TINY_UNET, WORDS

    other = tmp_path / "other"
    build_pipeline(WORDS, unet=unet_config(**{**TINY_UNET, "cross_attention_dim": 8}), text_width=8).save_pretrained(other)
    assert main(["compress", "--teacher", str(other), "--student", "bk-small", "--out", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    assert main(base + ["--data", "mini-world:8", "--student", str(tmp_path / "s")]) == 2
    assert "does not match this teacher" in one_line_error(capsys)


def test_webdataset_shards_stream_into_distill(tiny_teacher_dir, tmp_path):
    import io

    import webdataset as wds

    from bksdm.mini.world import ShapesWorld

    shards = tmp_path / "shards"
    shards.mkdir()
    world = ShapesWorld(seed=2)
    for s in range(2):
        with wds.TarWriter(str(shards / f"{s:05d}.tar")) as sink:
            for i in range(5):
                image, text, _ = world.sample(s * 5 + i)
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                sink.write({"__key__": f"{s}-{i}", "png": buf.getvalue(), "txt": text})
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(tiny_teacher_dir), "--data", str(shards / "{00000..00001}.tar"), "--out",
                 str(out), "--max-steps", "3", "--grad-accum", "1", *FAST]) == 0
    rows = _losses(out)
    assert len(rows) == 3 and int(rows[-1]["skipped"]) == 0
    # a folder of shards works too, and the stream order is the same
    assert main(["distill", "--teacher", str(tiny_teacher_dir), "--data", str(shards), "--out", str(tmp_path / "run2"),
                 "--max-steps", "3", "--grad-accum", "1", *FAST]) == 0
    assert [r["loss"] for r in _losses(tmp_path / "run2")] == [r["loss"] for r in rows]


def test_random_init_ignores_the_teacher_weights(tiny_teacher_dir, tmp_path):
    """init=random (the ablation's N1) must not start from the teacher's weights, also for a student folder."""
    assert main(["compress", "--teacher", str(tiny_teacher_dir), "--student", "bk-small", "--out", str(tmp_path / "s")]) == 0
    for k, student in enumerate(("bk-small", str(tmp_path / "s"))):  # a run folder per run
        warm = DistillRecipe(distill_cfg(tiny_teacher_dir, tmp_path / f"w{k}", student=student)).setup()
        cold = DistillRecipe(distill_cfg(tiny_teacher_dir, tmp_path / f"c{k}", student=student, init="random")).setup()
        t = dict(warm.teacher.unet.named_parameters())
        w, c = dict(warm.student.named_parameters()), dict(cold.student.named_parameters())
        key = "up_blocks.1.resnets.1.conv1.weight"  # from teacher up_blocks.1.resnets.2
        assert torch.equal(w[key], t["up_blocks.1.resnets.2.conv1.weight"].float())
        assert not torch.equal(c[key], w[key])


def test_final_pipeline_has_a_model_card(tiny_teacher_dir, tmp_path):
    """final/README.md parses with huggingface_hub's ModelCard and names the removed blocks and the savings."""
    from huggingface_hub import ModelCard

    run = DistillRecipe(distill_cfg(tiny_teacher_dir, tmp_path / "run", max_steps=2, sample_prompts=["a red circle"],
                                    sample_steps=2)).setup()
    run.train()
    card = ModelCard.load(tmp_path / "run" / "final" / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert {"bk-sdm", "bksdm-bk-small"} <= set(card.data.tags)
    # bk-small: the second block pair of every down stage, the mid-block and the middle pair of every up stage go
    for block in ("down_blocks.0.resnets.1", "down_blocks.2.attentions.1", "mid_block", "up_blocks.1.resnets.1"):
        assert f"`{block}`" in card.text, block
    assert "`down_blocks.0.resnets.0`" not in card.text  # kept
    assert "fewer" in card.text and "2 optimiser steps" in card.text and "![samples](samples.png)" in card.text
    assert (tmp_path / "run" / "final" / "samples.png").is_file()


def test_hugging_face_datasets_feed_distill_and_resume_exactly(tiny_teacher_dir, tmp_path, capsys):
    disk, parquet = hf_image_dataset(tmp_path, broken=3)
    cols = dict(image_column="picture", caption_column="caption")
    kw = dict(data=f"hf:{disk}", checkpoint_every=2, **cols)
    full = DistillRecipe(distill_cfg(tiny_teacher_dir, tmp_path / "a", max_steps=4, **kw)).setup()
    full.train()
    assert full.skipped >= 1  # the corrupt row, skipped and counted
    DistillRecipe(distill_cfg(tiny_teacher_dir, tmp_path / "b", max_steps=2, **kw)).setup().train()
    resumed = DistillRecipe(distill_cfg(tiny_teacher_dir, tmp_path / "b", max_steps=4, resume="latest", **kw)).setup()
    resumed.train()
    a, b = full.final_unet().state_dict(), resumed.final_unet().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # parquet files, map-style and streamed, from the CLI
    for i, extra in enumerate([[], ["--streaming"]]):
        assert main(["distill", "--teacher", str(tiny_teacher_dir), "--data", f"hf:{parquet}", "--out", str(tmp_path / f"p{i}"),
                     "--max-steps", "2", "--grad-accum", "1", "--image-column", "picture", "--caption-column", "caption",
                     *FAST, *extra]) == 0
    assert main(["cache", "--teacher", str(tiny_teacher_dir), "--data", f"hf:{disk}", "--out", str(tmp_path / "c"),
                 "--resolution", "32", "--image-column", "picture", "--caption-column", "caption"]) == 0
    assert "cached 7 of 8 items (1 skipped: 1 not an image)" in capsys.readouterr().out
    assert main(["distill", "--teacher", str(tiny_teacher_dir), "--data", f"hf:{disk}", "--out", str(tmp_path / "x"), *FAST]) == 2
    err = one_line_error(capsys)
    assert "no column 'image'" in err and "image_column=" in err


def test_timestep_bias_draws_the_chosen_timesteps_more_often_and_none_is_the_paper():
    from diffusers import DDPMScheduler

    from bksdm.training import noisy_inputs, timestep_weights

    assert timestep_weights(1000, "none", 0.25, 3.0) is None and timestep_weights(1000, "earlier", 0.25, 1.0) is None
    w = timestep_weights(1000, "earlier", 0.25, 3.0)
    assert w.shape == (1000,) and abs(float(w.sum()) - 1) < 1e-6 and torch.isclose(w[0], 3 * w[-1])
    sched = DDPMScheduler(num_train_timesteps=1000)
    lat = torch.zeros(20000, 1, 1, 1)
    _, t, _ = noisy_inputs(sched, lat, torch.Generator().manual_seed(0), w)
    share = float((t < 250).float().mean())  # 3 x 250 / (3 x 250 + 750) = 0.5
    assert abs(share - 0.5) < 0.02
    late = timestep_weights(1000, "later", 0.25, 3.0)
    assert torch.isclose(late[-1], 3 * late[0])
    # uniform draws are the same numbers as before the option existed (resume and reference checks rely on them)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    _, t1, _ = noisy_inputs(sched, lat[:8], g1)
    torch.randn(lat[:8].shape, generator=g2)
    assert torch.equal(t1, torch.randint(0, 1000, (8,), generator=g2))
