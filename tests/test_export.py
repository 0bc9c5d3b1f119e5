"""`bksdm export`: the single-file checkpoint in the original SD layout read back by diffusers' `from_single_file`
(the student's own config), and the half-precision folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from bksdm.cli import main
from tests.conftest import make_tiny_pipeline, one_line_error


@pytest.fixture(scope="module")
def kl_student(tmp_path_factory):
    """bk-small of a tiny teacher that has a real (tiny, random) AutoencoderKL, as SD pipelines do."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    root = tmp_path_factory.mktemp("kl")
    base = make_tiny_pipeline()
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=12, norm_num_groups=4, sample_size=32)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                                   scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root / "teacher")
    assert main(["compress", "--teacher", str(root / "teacher"), "--student", "bk-small", "--out", str(root / "student")]) == 0
    return root


def _images(pipe, seed: int = 0) -> np.ndarray:
    out = pipe(["a red circle at the top left", "a large blue square at the bottom right"], num_inference_steps=4,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    return out.images * 255


def test_single_file_round_trips_through_from_single_file(kl_student, tmp_path):
    from diffusers import StableDiffusionPipeline

    student, file = kl_student / "student", tmp_path / "student.safetensors"
    assert main(["export", str(student), "--out", str(file), "--dtype", "fp32"]) == 0
    with safe_open(str(file), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    # bk-small: one block per down stage (so input_blocks 1..7), no mid-block
    assert not any(k.startswith("model.diffusion_model.middle_block") for k in keys)
    assert max(int(k.split(".")[3]) for k in keys if ".input_blocks." in k) == 7
    removed = json.loads(meta["bksdm.removed_blocks"])
    assert "mid_block" in removed and "down_blocks.0.resnets.1" in removed
    assert json.loads(meta["bksdm.unet_config"])["mid_block_type"] is None

    folder = StableDiffusionPipeline.from_pretrained(student, safety_checker=None)
    single = StableDiffusionPipeline.from_single_file(str(file), config=str(student), local_files_only=True,
                                                      safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    diff = np.abs(_images(folder) - _images(single)).max()
    assert diff <= 1, diff


def test_single_file_in_half_precision_and_the_fp16_folder(kl_student, tmp_path):
    from diffusers import StableDiffusionPipeline

    student = kl_student / "student"
    assert main(["export", str(student), "--out", str(tmp_path / "s16.safetensors")]) == 0
    with safe_open(str(tmp_path / "s16.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert main(["export", str(student), "--out", str(tmp_path / "f16"), "--format", "diffusers-fp16"]) == 0
    for part in ("unet", "vae", "text_encoder"):
        (weights,) = (tmp_path / "f16" / part).glob("*.safetensors")
        with safe_open(str(weights), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}, part
    assert (tmp_path / "f16" / "bksdm.json").is_file() and (tmp_path / "f16" / "README.md").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "f16", safety_checker=None, torch_dtype=torch.float16)
    ref = StableDiffusionPipeline.from_pretrained(student, safety_checker=None).unet.state_dict()
    got = pipe.unet.state_dict()
    assert all(torch.equal(ref[k].half(), got[k]) for k in ref)


def test_export_faults(kl_student, tiny_teacher_dir, tmp_path, capsys):
    student = kl_student / "student"
    file = tmp_path / "x.safetensors"
    file.write_text("mine")
    assert main(["export", str(student), "--out", str(file)]) == 2
    assert "already exists" in one_line_error(capsys)
    assert file.read_text() == "mine"  # never overwritten without --overwrite
    # the mini world's parameter-free VAE has no single-file layout: a clear refusal, nothing written
    assert main(["export", str(tiny_teacher_dir), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "diffusers-fp16" in one_line_error(capsys)
    assert not (tmp_path / "m.safetensors").exists()
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "nope" in one_line_error(capsys)
    assert main(["export", str(student), "--out", str(tmp_path / "z.safetensors"), "--dtype", "fp8"]) == 2
    assert "fp8" in one_line_error(capsys)
    assert main(["export", str(student), "--out", str(file.parent)]) == 2  # a folder where a file is due
    assert "folder" in one_line_error(capsys)


def test_sd_v2_text_encoders_use_the_openclip_layout(kl_student, tmp_path):
    """SD-v2 pipelines (OpenCLIP text tower, gelu) are written as OpenCLIP keys with fused q/k/v and read back."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    pipe = StableDiffusionPipeline.from_pretrained(kl_student / "student", safety_checker=None)
    cfg = CLIPTextConfig(**{**pipe.text_encoder.config.to_dict(), "hidden_act": "gelu"})
    torch.manual_seed(2)
    pipe.text_encoder = CLIPTextModel(cfg)
    pipe.register_modules(text_encoder=pipe.text_encoder)
    pipe.save_pretrained(tmp_path / "v2")
    file = tmp_path / "v2.safetensors"
    assert main(["export", str(tmp_path / "v2"), "--out", str(file), "--dtype", "fp32"]) == 0
    with safe_open(str(file), "pt") as f:
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in f.keys()
    single = StableDiffusionPipeline.from_single_file(str(file), config=str(tmp_path / "v2"), local_files_only=True,
                                                      safety_checker=None)
    a, b = pipe.text_encoder.state_dict(), single.text_encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith("position_ids"))


def test_sdxl_student_single_file_round_trips_through_from_single_file(tmp_path):
    """An SDXL-layout student (KOALA-style: a stage's transformer depth cut) exported to SDXL's single-file layout
    (``label_emb``, ``conditioner.embedders.0/1``) and read back by diffusers' ``from_single_file``: every tensor
    equal, the same images."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    from bksdm.mini.model import build_sdxl_pipeline
    from bksdm.mini.world import WORDS

    # the two encoders of different widths, as SDXL's (768, 1280): diffusers tells them apart by width
    base = build_sdxl_pipeline(WORDS, widths=(16, 32))
    torch.manual_seed(2)
    cfg2 = {**base.text_encoder_2.config.to_dict(), "hidden_act": "gelu"}  # OpenCLIP bigG's activation, as SDXL's
    text2 = CLIPTextModelWithProjection(type(base.text_encoder_2.config)(**cfg2))
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32)
    teacher = StableDiffusionXLPipeline(vae=vae, text_encoder=base.text_encoder, text_encoder_2=text2,
                                        tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
                                        scheduler=base.scheduler, add_watermarker=False)
    teacher.save_pretrained(tmp_path / "teacher")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"name": "koala-like", "down": [[0], [0], [0]], "mid": True, "up": [[0, 2], [0, 2], [0, 2]],
                                "depth": {"down": [None, None, [0, 2]], "mid": [0, 2], "up": [[0, 2], None, None]}}))
    student, file = tmp_path / "student", tmp_path / "student.safetensors"
    assert main(["compress", "--teacher", str(tmp_path / "teacher"), "--student", str(spec), "--out", str(student)]) == 0
    assert main(["export", str(student), "--out", str(file), "--dtype", "fp32"]) == 0
    with safe_open(str(file), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "model.diffusion_model.input_blocks.5.1.transformer_blocks.1.attn1.to_q.weight" in keys  # depth 2 of 3
    folder = StableDiffusionXLPipeline.from_pretrained(student)
    single = StableDiffusionXLPipeline.from_single_file(str(file), config=str(student), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    args = dict(prompt="a red circle at the top left", num_inference_steps=2, output_type="np", height=32, width=32)
    np.testing.assert_array_equal(folder(**args, generator=torch.Generator().manual_seed(0)).images,
                                  single(**args, generator=torch.Generator().manual_seed(0)).images)


def test_sd_cpp_layout_numbers_bk_tiny_as_stable_diffusion_cpp_reads_it(kl_student, tmp_path, capsys):
    """bk-tiny in SD's gapped numbering (sd.cpp's tiny U-Net: input blocks 1, 3 (op), 4, 6 (op), 7; upsamplers at
    output blocks 2.1 and 5.2); the same tensors as the default layout under other names. bk-small: refused."""
    teacher, tiny = kl_student / "teacher", tmp_path / "tiny"
    assert main(["compress", "--teacher", str(teacher), "--student", "bk-tiny", "--out", str(tiny)]) == 0
    files = {lay: tmp_path / f"{lay}.safetensors" for lay in ("comfyui", "sd-cpp")}
    for lay, file in files.items():
        assert main(["export", str(tiny), "--out", str(file), "--dtype", "fp32", "--layout", lay]) == 0
    tensors = {}
    for lay, file in files.items():
        with safe_open(str(file), "pt") as f:
            tensors[lay] = {k: f.get_tensor(k) for k in f.keys()}
            assert f.metadata()["bksdm.layout"] == lay
    unet = {k.split(".")[3] for k in tensors["sd-cpp"] if k.startswith("model.diffusion_model.input_blocks.")}
    assert unet == {"0", "1", "3", "4", "6", "7"}
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in tensors["sd-cpp"]
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in tensors["sd-cpp"]  # first upsampler at .1
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in tensors["sd-cpp"]
    assert not any(".middle_block." in k for k in tensors["sd-cpp"])
    dense = {k.split(".")[3] for k in tensors["comfyui"] if k.startswith("model.diffusion_model.input_blocks.")}
    assert dense == {"0", "1", "2", "3", "4", "5"}  # ComfyUI's reading: blocks numbered densely
    assert len(tensors["sd-cpp"]) == len(tensors["comfyui"])
    assert sorted(v.sum().item() for v in tensors["sd-cpp"].values()) == \
        sorted(v.sum().item() for v in tensors["comfyui"].values())  # the same tensors, renamed
    assert main(["export", str(kl_student / "student"), "--out", str(tmp_path / "small.safetensors"),
                 "--layout", "sd-cpp"]) == 2
    err = one_line_error(capsys)
    assert "stable-diffusion.cpp builds SD U-Nets only as the full layout or BK-SDM-Tiny's" in err
    assert "4 stages" in err and not (tmp_path / "small.safetensors").exists()
    # the full SD layout: both numberings coincide
    assert main(["export", str(teacher), "--out", str(tmp_path / "t1.safetensors"), "--layout", "sd-cpp"]) == 0
    assert main(["export", str(teacher), "--out", str(tmp_path / "t2.safetensors")]) == 0
    with safe_open(str(tmp_path / "t1.safetensors"), "pt") as a, safe_open(str(tmp_path / "t2.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
