"""The fast path (`bksdm.fast`): tiny decoders, feature caching across steps, compiled U-Nets."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

from bksdm.cli import main
from bksdm.fast import FeatureCache, compile_unet, load_decoder, unet_forward
from bksdm.generate import generate_images
from bksdm.mini.model import sdxl_unet_config, unet_config
from tests.conftest import TINY_UNET, make_tiny_pipeline, one_line_error


def _unets():
    """U-Nets of every layout the cache must handle: SD-v1 (with a mid-block), a BK student (no mid-block, one
    layer per down stage), an LCM U-Net (guidance embedding), SDXL (text_time conditioning, no attention outside)."""
    torch.manual_seed(0)
    sd = unet_config(**TINY_UNET, sample_size=16)
    student = {**sd, "mid_block_type": None, "layers_per_block": 1}
    lcm = {**sd, "time_cond_proj_dim": 8}
    return {"sd": UNet2DConditionModel.from_config(sd), "student": UNet2DConditionModel.from_config(student),
            "lcm": UNet2DConditionModel.from_config(lcm),
            "sdxl": UNet2DConditionModel.from_config(sdxl_unet_config())}


def _inputs(unet, size: int = 16, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    cfg = unet.config
    kw = {"encoder_hidden_states": torch.randn(batch, 5, cfg.cross_attention_dim, generator=g)}
    if cfg.time_cond_proj_dim:
        kw["timestep_cond"] = torch.randn(batch, cfg.time_cond_proj_dim, generator=g)
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g),
                                   "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * batch, dtype=torch.float32)}
    return torch.randn(batch, cfg.in_channels, size, size, generator=g), torch.tensor([700, 700]), kw


@pytest.mark.parametrize("size", [16, 12])  # 12: not a multiple of the upsampling, diffusers forwards upsample sizes
def test_split_forward_equals_diffusers_exactly(size):
    """The whole pass of `unet_forward` is `UNet2DConditionModel.forward`, bit for bit; a cached pass given the deep
    features of the same input is the whole pass, bit for bit, for every branch."""
    for name, unet in _unets().items():
        x, t, kw = _inputs(unet, size)
        with torch.no_grad():
            ref = unet(x, t, **kw).sample
            for branch in range(len(unet.up_blocks) - 1):
                whole, deep = unet_forward(unet, x, t, branch=branch, **kw)
                assert torch.equal(whole, ref), name
                cached, _ = unet_forward(unet, x, t, branch=branch, deep=deep, **kw)
                assert torch.equal(cached, ref), (name, branch)
                # the deep features matter: others give another prediction
                other, _ = unet_forward(unet, x, t, branch=branch, deep=deep + 1, **kw)
                assert not torch.allclose(other, ref), (name, branch)


def test_a_reused_cache_starts_afresh():
    """One FeatureCache used for two pipeline calls gives the same images both times (its counters reset)."""
    import numpy as np

    pipe = make_tiny_pipeline()
    parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer}
    from bksdm.generate import family_pipeline, initial_latents

    p, _ = family_pipeline(parts, pipe.scheduler)
    p.set_progress_bar_config(disable=True)
    cache = FeatureCache(pipe.unet, 3)
    runs = []
    for _ in range(2):
        with cache:
            runs.append(p(["a red circle"], num_inference_steps=4, latents=initial_latents([1], (12, 16, 16)),
                          output_type="np").images)
    assert np.array_equal(runs[0], runs[1]) and "forward" not in pipe.unet.__dict__


def test_feature_cache_schedule_and_interval_one():
    """interval 1 is the uncached pipeline, image for image; interval 2 runs every other U-Net call whole and gives
    other, close images."""
    import numpy as np

    pipe = make_tiny_pipeline()
    parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer}
    prompts, seeds = ["a red circle", "a blue square at the top"], [3, 4]
    plain = generate_images(parts, pipe.scheduler, prompts, seeds, steps=4)
    one = generate_images(parts, pipe.scheduler, prompts, seeds, steps=4, cache_interval=1)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, one))

    calls = []
    orig = FeatureCache.__call__

    def counting(self, *a, **k):
        out = orig(self, *a, **k)
        calls.append((self.calls, self.full_calls))
        return out

    FeatureCache.__call__ = counting
    try:
        two = generate_images(parts, pipe.scheduler, prompts, seeds, steps=4, cache_interval=2)
    finally:
        FeatureCache.__call__ = orig
    n = len(calls)  # PNDM's PLMS calls the U-Net once per timestep (5 for 4 steps: the first one twice)
    assert calls[-1] == (n, (n + 1) // 2)
    assert "forward" not in pipe.unet.__dict__  # the U-Net is itself again after the run
    diff = [np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() for a, b in zip(plain, two)]
    assert all(0 < d < 40 for d in diff), diff


def test_feature_cache_refuses_what_it_cannot_do():
    from bksdm.errors import UserError

    unet = _unets()["sd"]
    with pytest.raises(UserError, match="cache branch 3 does not exist in a U-Net of 4 stages; choose 0..2"):
        FeatureCache(unet, 2, branch=3)
    with pytest.raises(UserError, match="cache interval must be 1"):
        FeatureCache(unet, 0)


def _taesd_pipeline_parts(tmp_path):
    """A tiny SD pipeline whose VAE downsamples 8x with 4 latent channels (SD's), and a saved TAESD of the real
    architecture (diffusers' AutoencoderTiny defaults: 1.22M decoder parameters) with random weights."""
    torch.manual_seed(0)
    pipe = make_tiny_pipeline()
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "in_channels": 4, "out_channels": 4, "sample_size": 8})
    vae = AutoencoderKL(block_out_channels=[8] * 4, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=4, sample_size=64)
    taesd = AutoencoderTiny()
    taesd.save_pretrained(tmp_path / "taesd")
    return {"unet": unet, "vae": vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer}, pipe.scheduler


def test_tiny_decoder_loads_and_decodes(tmp_path):
    parts, sched = _taesd_pipeline_parts(tmp_path)
    decoder = load_decoder(tmp_path / "taesd", parts["unet"], parts["vae"])
    assert sum(p.numel() for p in decoder.decoder.parameters()) == 1_222_531  # TAESD's decoder
    with_tiny = {**parts, "vae": decoder}
    images = generate_images(with_tiny, sched, ["a red circle"], [5], steps=2, resolution=64)
    assert images[0].size == (64, 64)
    # the pipeline decoded the U-Net's latents with the tiny decoder, as the decoder does on its own
    from bksdm.generate import family_pipeline, initial_latents

    pipe, _ = family_pipeline(with_tiny, sched)
    pipe.set_progress_bar_config(disable=True)
    lat = pipe(["a red circle"], height=64, width=64, num_inference_steps=2, guidance_scale=7.5,
               latents=initial_latents([5], (4, 8, 8)), output_type="latent").images
    with torch.no_grad():
        own = ((decoder.decode(lat).sample[0] / 2 + 0.5).clamp(0, 1) * 255).round().permute(1, 2, 0).to(torch.uint8)
    import numpy as np

    assert np.abs(np.asarray(images[0], int) - own.numpy().astype(int)).max() <= 1


def test_tiny_decoder_faults(tmp_path, capsys, tiny_teacher_dir):
    """A decoder of other latent channels, one of another upsampling, and a folder that is not one: one line, exit 2."""
    (tmp_path / "p.txt").write_text("a red circle\n")
    AutoencoderTiny(latent_channels=16).save_pretrained(tmp_path / "taesd3")
    base = ["generate", "--model", str(tiny_teacher_dir), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"),
            "--steps", "1"]
    assert main(base + ["--decoder", str(tmp_path / "taesd3")]) == 2
    assert "decodes 16-channel latents but the U-Net makes 12" in one_line_error(capsys)
    AutoencoderTiny(latent_channels=12).save_pretrained(tmp_path / "taesd12")
    assert main(base + ["--decoder", str(tmp_path / "taesd12")]) == 2
    assert "upsamples latents 8x but this model's VAE 2x" in one_line_error(capsys)
    assert main(base + ["--decoder", str(tmp_path / "nothing")]) == 2
    assert "is not a diffusers AutoencoderTiny folder" in one_line_error(capsys)
    unet_dir = tmp_path / "unet"
    UNet2DConditionModel.from_pretrained(tiny_teacher_dir / "unet").save_pretrained(unet_dir)
    assert main(base + ["--decoder", str(unet_dir)]) == 2
    assert "holds a UNet2DConditionModel, not an AutoencoderTiny" in one_line_error(capsys)
    assert main(base + ["--cache-interval", "2", "--cache-branch", "5"]) == 2
    assert "cache branch 5 does not exist" in one_line_error(capsys)
    assert main(base + ["--cache-interval", "0"]) == 2
    assert "--cache-interval 0 is too small" in one_line_error(capsys)
    assert main(["profile", "--model", str(tiny_teacher_dir), "--no-latency", "--decoder", str(tmp_path / "nothing")]) == 2
    assert "is not a diffusers AutoencoderTiny folder" in one_line_error(capsys)
    assert not (tmp_path / "o" / "images").exists() or not any((tmp_path / "o" / "images").iterdir())


def test_generate_cli_fast_path(tmp_path, capsys, tiny_teacher_dir):
    """`generate --cache-interval 2` writes every image and says so; interval 1 writes the plain images."""
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    base = ["generate", "--model", str(tiny_teacher_dir), "--prompts", str(tmp_path / "p.txt"), "--steps", "3",
            "--dtype", "fp32", "--lossless"]
    assert main(base + ["--out", str(tmp_path / "plain")]) == 0
    assert main(base + ["--out", str(tmp_path / "one"), "--cache-interval", "1"]) == 0
    assert main(base + ["--out", str(tmp_path / "two"), "--cache-interval", "2"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["generated"] == 2 and res["cache_interval"] == 2 and res["decoder"] == "vae" and not res["compile"]
    for name in ("00000.png", "00001.png"):
        assert (tmp_path / "plain/images" / name).read_bytes() == (tmp_path / "one/images" / name).read_bytes()
        assert (tmp_path / "plain/images" / name).read_bytes() != (tmp_path / "two/images" / name).read_bytes()


def test_compiled_unet_within_one_level():
    """`--compile` (inductor on this CPU) gives the eager images within 1/255, with and without caching."""
    import numpy as np

    pipe = make_tiny_pipeline()
    parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer}
    prompts, seeds = ["a red circle"], [3]
    eager = [generate_images(parts, pipe.scheduler, prompts, seeds, steps=3, cache_interval=k) for k in (1, 2)]
    compiled_fn, calls = compile_unet(parts["unet"]), []

    def forward(*args):  # the compiled function really runs every U-Net call
        calls.append(args[-1] is None)
        return compiled_fn(*args)

    compiled = [generate_images(parts, pipe.scheduler, prompts, seeds, steps=3, cache_interval=k, forward=forward)
                for k in (1, 2)]
    assert calls.count(True) == 4 + 2 and calls.count(False) == 2  # PLMS: 4 calls for 3 steps; cached every other
    for e, c in zip(eager, compiled):
        assert np.abs(np.asarray(e[0], int) - np.asarray(c[0], int)).max() <= 1


def test_export_fp16_ships_the_tiny_decoder(tmp_path, capsys):
    """`export --format diffusers-fp16 --decoder` writes a folder whose vae is the tiny decoder, loaded by the family's
    pipeline class with no edits, and says so in the record; with another format it is refused in one line."""
    from diffusers import StableDiffusionPipeline

    parts, sched = _taesd_pipeline_parts(tmp_path)
    StableDiffusionPipeline(**parts, scheduler=sched, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "bksdm.json").write_text(json.dumps({"teacher": "t"}))
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "fp16"), "--format", "diffusers-fp16",
                 "--decoder", str(tmp_path / "taesd")]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "fp16")
    assert type(pipe.vae).__name__ == "AutoencoderTiny"
    from safetensors.torch import load_file

    saved = load_file(str(next((tmp_path / "fp16" / "vae").glob("*.safetensors"))))
    tiny = AutoencoderTiny.from_pretrained(tmp_path / "taesd").state_dict()
    assert saved.keys() == tiny.keys() and all(saved[k].dtype == torch.float16 and torch.equal(saved[k], tiny[k].half()) for k in saved)
    assert json.loads((tmp_path / "fp16" / "bksdm.json").read_text())["decoder"]["class"] == "AutoencoderTiny"
    assert "tiny decoder" in (tmp_path / "fp16" / "README.md").read_text()
    capsys.readouterr()
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "one.safetensors"),
                 "--decoder", str(tmp_path / "taesd")]) == 2
    assert "use it with --format diffusers-fp16" in one_line_error(capsys)


def test_profile_tiny_decoder_and_cache_rows(capsys):
    """`profile --decoder taesd --cache-interval 2` counts TAESD's decoder and the cached calls: a cached call costs
    the outermost stage only, and the image's MACs are whole calls + cached calls + one decode."""
    assert main(["profile", "--arch", "sd-v1", "--student", "bk-small", "--no-latency", "--steps", "4", "--decoder", "taesd",
                 "--cache-interval", "2", "--json"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    for r in recs:
        assert r["decoder"] == "AutoencoderTiny" and r["vae_decoder_params"] == 1_222_531
        assert 0.2 < r["unet_cached_share"] < 0.35  # the outermost stage: 29% of SD-v1's U-Net MACs
        expect = 2 * r["text_encoder_gmacs"] + 2 * (2 * r["unet_gmacs"] + 2 * r["unet_cached_gmacs"]) + r["vae_decoder_gmacs"]
        assert abs(r["whole_gmacs"] - expect) < 0.2
    assert main(["profile", "--arch", "sd-v1", "--no-latency", "--cache-interval", "2", "--cache-branch", "3"]) == 2
    assert "cache branch 3 does not exist in a U-Net of 4 stages" in one_line_error(capsys)
