"""`bksdm compress` and `bksdm profile` through the real CLI, in-process."""

from __future__ import annotations

import json
import re

import pytest
import torch

from bksdm.cli import main
from tests.conftest import one_line_error


def test_compress_roundtrip_and_generate(tiny_teacher_dir, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "small"
    assert main(["compress", "--teacher", str(tiny_teacher_dir), "--student", "bk-small", "--out", str(out)]) == 0
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    rec = json.loads((out / "bksdm.json").read_text())
    assert rec["spec"]["name"] == "bk-small" and rec["params"]["student_unet"] < rec["params"]["teacher_unet"]
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.unet.config.mid_block_type is None and pipe.unet.mid_block is None
    teacher = StableDiffusionPipeline.from_pretrained(tiny_teacher_dir)
    for key, src in rec["key_map"].items():  # the saved student is the teacher's tensors
        assert torch.equal(pipe.unet.state_dict()[key], teacher.unet.state_dict()[src])
    img = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (1, 32, 32, 3) and float(abs(img).sum()) > 0
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")  # the hubs' metadata and the removed blocks, for bk-tiny too
    assert card.data.library_name == "diffusers" and "bksdm-bk-small" in card.data.tags and "`mid_block`" in card.text
    assert main(["compress", "--teacher", str(tiny_teacher_dir), "--student", "bk-tiny", "--out", str(tmp_path / "tiny")]) == 0
    tiny = ModelCard.load(tmp_path / "tiny" / "README.md").text
    assert "`down_blocks.3.resnets.0`" in tiny and "`up_blocks.0.resnets.0`" in tiny  # the innermost stage is gone


def test_compress_custom_spec(tiny_teacher_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    spec = tmp_path / "mine.json"
    spec.write_text(json.dumps({"name": "mine", "down": [[1], [0], [0], None], "mid": False,
                                "up": [None, [1, 2], [0, 2], [0, 1]]}))
    out = tmp_path / "mine"
    assert main(["compress", "--teacher", str(tiny_teacher_dir), "--student", str(spec), "--out", str(out)]) == 0
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert len(unet.down_blocks) == 3
    rec = json.loads((out / "bksdm.json").read_text())
    assert rec["key_map"]["down_blocks.0.resnets.0.conv1.weight"] == "down_blocks.0.resnets.1.conv1.weight"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--student", "bk-huge"], "unknown student 'bk-huge'"),
        (["--teacher", "/nonexistent/folder"], "does not exist"),
        (["--teacher", "CompVis/stable-diffusion-v1-4"], "HF_HUB_OFFLINE.*--local-dir"),
    ],
)
def test_compress_errors(tiny_teacher_dir, tmp_path, capsys, args, message):
    base = {"--teacher": str(tiny_teacher_dir), "--student": "bk-base", "--out": str(tmp_path / "o")}
    base.update(dict(zip(args[::2], args[1::2])))
    code = main(["compress", *[x for kv in base.items() for x in kv]])
    err = one_line_error(capsys)
    assert code == 2
    assert re.search(message, err), err


def test_compress_rejects_unsupported_teacher(tmp_path, capsys):
    from bksdm.arch.families import family_unet_config

    folder = tmp_path / "other" / "unet"
    folder.mkdir(parents=True)
    cfg = family_unet_config("sd-v1") | {"addition_embed_type": "image", "_class_name": "UNet2DConditionModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    assert main(["compress", "--teacher", str(tmp_path / "other"), "--student", "bk-base", "--out", str(tmp_path / "o")]) == 2
    assert "SDXL" in capsys.readouterr().err  # the message names what is supported


def test_profile_arch_json(capsys):
    assert main(["profile", "--arch", "sd-v1", "--student", "bk-base", "bk-small", "bk-tiny", "--no-latency", "--json"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in recs] == ["sd-v1", "bk-base", "bk-small", "bk-tiny"]
    assert recs[0]["unet_params"] == 859_520_964 and recs[0]["unet_gmacs"] == pytest.approx(338.6, rel=0.005)
    assert recs[0]["text_encoder_params"] == 123_060_480 and recs[0]["vae_decoder_params"] == 49_490_179
    assert [round(r["whole_params"] / 1e9, 2) for r in recs] == [1.03, 0.75, 0.65, 0.50]  # facts.md


def test_profile_v2_768_uses_96_latent(capsys):
    assert main(["profile", "--arch", "sd-v2", "--no-latency", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    # a 96x96 latent costs (96/64)^2 = 2.25x the 64x64 convolution work of sd-v2-base
    assert main(["profile", "--arch", "sd-v2-base", "--no-latency", "--json"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert rec["unet_params"] == base["unet_params"] == 865_910_724
    assert rec["unet_gmacs"] / base["unet_gmacs"] > 2.2


def test_profile_pipeline_folder_with_latency(tiny_teacher_dir, capsys):
    assert main(["profile", "--model", str(tiny_teacher_dir), "--runs", "1", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "image fp32 s" in out and "image bf16 s" in out and "Latency: median" in out


def test_profile_errors(capsys):
    assert main(["profile", "--arch", "sd-v3", "--no-latency"]) == 2
    assert "sd-v1, sd-v2-base, sd-v2, sdxl" in capsys.readouterr().err
    assert main(["profile", "--arch", "sd-v1", "--dtypes", "int3"]) == 2


def test_random_components_latency_path():
    """The --arch route: random weights of given configs, real latency in fp32 and bf16."""
    from bksdm.mini.model import text_encoder_config, unet_config
    from bksdm.profile import profile_components, random_components
    from tests.conftest import TINY_UNET

    vae = {"block_out_channels": [8, 8], "norm_num_groups": 4, "latent_channels": 12, "layers_per_block": 1,
           "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
    c = random_components("tiny", unet_config(**TINY_UNET), text_encoder_config(30, 12, width=16), vae)
    assert torch.equal(c.text_encoder.embeddings.position_ids[0], torch.arange(12))
    assert all(torch.isfinite(p).all() for p in c.unet.parameters())
    rec = profile_components(c, latency=True, dtypes=("fp32", "bf16"), runs=1, steps=2).record(2)
    assert rec["name"] == "tiny"
    assert set(rec["latency_s"]) == {"fp32", "bf16"} and rec["latency_s"]["fp32"]["unet"] > 0
    assert rec["unet_gmacs"] > 0 and rec["vae_decoder_params"] == sum(p.numel() for p in c.vae.decoder.parameters())


def test_cli_help_needs_neither_torch_nor_diffusers():
    """Every subcommand's parser is built without the heavy libraries, so `bksdm --help` answers at once."""
    import subprocess
    import sys

    code = ("import sys; from bksdm.cli import build_parser, main\n"
            "build_parser()\n"
            "try: main(['dreambooth', '--help'])\n"
            "except SystemExit: pass\n"
            "heavy = sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules))\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_inspect_names_removed_blocks_per_stage(tiny_teacher_dir, tmp_path, capsys):
    """From bksdm.json: the removed blocks by name; by config matching: how many; per-stage parameters add up."""
    for spec in ("bk-small", "bk-tiny"):
        assert main(["compress", "--teacher", str(tiny_teacher_dir), "--student", spec, "--out", str(tmp_path / spec)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "bk-small"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    rows = {r["stage"]: r for r in info["stages"]}
    assert info["from_record"] and info["spec"] == "bk-small"
    assert rows["down_blocks.0"]["removed"] == ["resnets.1", "attentions.1"] and rows["down_blocks.3"]["removed"] == ["resnets.1"]
    assert rows["mid_block"]["student_stage"] is None and rows["up_blocks.1"]["removed"] == ["resnets.1", "attentions.1"]
    rec = json.loads((tmp_path / "bk-small" / "bksdm.json").read_text())
    assert info["unet_params"] == {"teacher": rec["params"]["teacher_unet"], "student": rec["params"]["student_unet"]}
    assert sum(r["student_params"] for r in info["stages"]) < info["unet_params"]["student"]  # + conv_in, time embedding ...
    assert info["unet_gmacs"]["student"] < info["unet_gmacs"]["teacher"]
    assert main(["inspect", str(tmp_path / "bk-tiny")]) == 0
    table = capsys.readouterr().out
    assert "| down_blocks.3 | 2 -> 0 | all |" in table and "| up_blocks.0 | 3 -> 0 | all |" in table
    assert main(["inspect", str(tmp_path / "bk-tiny" / "unet"), "--teacher", str(tiny_teacher_dir)]) == 0
    assert "| down_blocks.0 | 4 -> 2 | 2 of 4 |" in capsys.readouterr().out  # no record: counts only
    assert main(["inspect", str(tmp_path / "bk-tiny" / "unet")]) == 2
    assert "--teacher" in one_line_error(capsys)
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "does not exist" in one_line_error(capsys)
