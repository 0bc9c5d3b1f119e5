"""`bksdm generate --lora` on SD3 and Flux pipelines (tiny random ones): a transformer LoRA saved by bksdm's own saver
(alpha != rank, folded) is fused, the images equal the diffusers pipeline's after its own ``load_lora_weights`` +
``fuse_lora`` on the same latents, a LoRA made for another architecture is refused in one line, and a teacher's
LoRA is moved onto a DiT student through its key map."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from bksdm.cli import main
from tests.conftest import one_line_error
from tests.test_flow import tiny_flux, tiny_sd3

PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
PROMPTS = ["a red circle at the top", "a small blue square"]
TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]  # in every block of both families


@pytest.fixture(scope="module")
def flow_models(tmp_path_factory):
    """SD3 without T5 and Flux-schnell folders, each with a bksdm-saved transformer LoRA (rank 2, alpha 6, random
    non-zero up weights) beside them, and a prompt file."""
    from peft import LoraConfig

    from bksdm.lora import save_lora

    root = tmp_path_factory.mktemp("gen_lora_flow")
    for kind, pipe in (("sd3", tiny_sd3(t5=False)), ("flux", tiny_flux(guidance=False))):
        pipe.save_pretrained(root / kind)
        net = pipe.transformer
        net.add_adapter(LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS, init_lora_weights="gaussian"))
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.5)
        save_lora(root / f"{kind}-lora", PIPELINES[kind], net, denoiser="transformer")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def _generate(model, prompts, out, *extra):
    return main(["generate", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--steps", "2",
                 "--resolution", "32", "--save-size", "0", "--dtype", "fp32", "--lossless", *extra])


def _images(out):
    return {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted((out / "images").iterdir())}


def _diffusers_images(kind, folder, lora_folder):
    """The family's pipeline from the folder, the LoRA through its own load_lora_weights + fuse_lora, sampled with
    generate's latents (each image's own seed, the family's layout), generators, guidance and T5 length."""
    import diffusers

    from bksdm.generate import image_name, initial_latents, prompt_seed
    from bksdm.models import pipeline_family

    absent = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3" else {}
    pipe = getattr(diffusers, PIPELINES[kind]).from_pretrained(folder, **absent)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_folder)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    family = pipeline_family(folder)
    names = [image_name(f"{i:05d}.jpg", True) for i in range(len(PROMPTS))]
    seeds = [prompt_seed(n, 0) for n in names]
    shape = family.latent_shape(pipe.transformer.config, 32, pipe.vae_scale_factor)
    out = pipe(PROMPTS, height=32, width=32, num_inference_steps=2, guidance_scale=family.guidance,
               latents=family.pipeline_latents(initial_latents(seeds, shape)), output_type="pil",
               generator=[torch.Generator().manual_seed(s + 1) for s in seeds],
               max_sequence_length=family.max_sequence_length)
    return {n: np.asarray(im, dtype=np.int16) for n, im in zip(names, out.images)}


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_generate_lora_on_transformer_pipelines_equals_diffusers_load_and_fuse(kind, flow_models, tmp_path, capsys):
    """Images with --lora differ from those without and equal (within one 8-bit level) the diffusers pipeline's after
    its own load_lora_weights + fuse_lora on the same latents; the printed record counts the LoRA's modules."""
    model, lora = flow_models / kind, flow_models / f"{kind}-lora" / "pytorch_lora_weights.safetensors"
    assert _generate(model, flow_models / "prompts.txt", tmp_path / "base") == 0
    capsys.readouterr()
    assert _generate(model, flow_models / "prompts.txt", tmp_path / "lora", "--lora", str(lora)) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["lora"] == {"modules": len(_lora_keys(lora)), "remapped": 0, "dropped": 0}  # one lora_A a module
    assert len(_lora_keys(lora)) == {"sd3": 3 * 4, "flux": 4 + 2 * 3}[kind]  # Flux's single blocks: no to_out
    base, got = _images(tmp_path / "base"), _images(tmp_path / "lora")
    want = _diffusers_images(kind, model, lora.parent)
    assert got.keys() == want.keys() == base.keys() and len(got) == len(PROMPTS)
    for name in got:
        assert np.abs(got[name] - base[name]).max() > 8, name  # the LoRA changes the picture
        assert np.abs(got[name] - want[name]).max() <= 1, name


def _lora_keys(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return [k for k in f.keys() if ".lora_A." in k]


def test_generate_refuses_a_lora_of_another_architecture_in_one_line(flow_models, tmp_path, capsys):
    """An SD3 LoRA on the Flux pipeline (Flux's single blocks lack the modules, shapes differ), a LoRA whose up
    weights are the wrong width, and an SD-v1 U-Net LoRA on SD3 (no transformer module at all): exit 2, one line,
    before any image is written."""
    from safetensors.torch import load_file, save_file

    sd3_lora = flow_models / "sd3-lora" / "pytorch_lora_weights.safetensors"
    assert _generate(flow_models / "flux", flow_models / "prompts.txt", tmp_path / "a", "--lora", str(sd3_lora)) == 2
    msg = one_line_error(capsys)
    assert "does not fit this transformer" in msg and "made for another architecture" in msg
    assert re.search(r"\b\d+ of its 12 transformer modules fit \(first that does not: transformer_blocks\.\d", msg)

    state = load_file(flow_models / "flux-lora" / "pytorch_lora_weights.safetensors")
    key = next(k for k in state if ".lora_B." in k)
    state[key] = torch.randn(state[key].shape[0] + 4, state[key].shape[1])
    save_file(state, tmp_path / "wide.safetensors")
    assert _generate(flow_models / "flux", flow_models / "prompts.txt", tmp_path / "b",
                     "--lora", str(tmp_path / "wide.safetensors")) == 2
    msg = one_line_error(capsys)
    n = len(_lora_keys(flow_models / "flux-lora" / "pytorch_lora_weights.safetensors"))
    assert f"{n - 1} of its {n} transformer modules fit" in msg and key.split(".lora_B.")[0][12:] in msg

    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, 8),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(8, 2)},
              tmp_path / "unet.safetensors")
    assert _generate(flow_models / "sd3", flow_models / "prompts.txt", tmp_path / "c",
                     "--lora", str(tmp_path / "unet.safetensors")) == 2
    assert "adapts no transformer module" in one_line_error(capsys)
    assert not any((tmp_path / d / "images").exists() and any((tmp_path / d / "images").iterdir()) for d in "abc")


def test_teacher_lora_is_moved_onto_a_dit_student_through_its_key_map(flow_models, tmp_path, capsys):
    """The SD3 teacher's LoRA on its bk-small student (teacher blocks 0 and 2 kept as 0 and 1): block 1's modules
    dropped, block 2's moved to the student's block 1; each fused student weight is W + B A of the teacher module
    whose weight it was initialised from; `generate --lora` on the student samples with it and records the counts."""
    import diffusers
    from safetensors.torch import load_file

    from bksdm.generate import fuse_lora

    student = tmp_path / "student"
    assert main(["compress", "--teacher", str(flow_models / "sd3"), "--student", "bk-small", "--out", str(student)]) == 0
    lora = flow_models / "sd3-lora" / "pytorch_lora_weights.safetensors"
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(student, text_encoder_3=None, tokenizer_3=None)
    parts = {n: c for n, c in pipe.components.items() if c is not None and n != "scheduler"}
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    capsys.readouterr()
    done = fuse_lora(parts, pipe.scheduler, lora, json.loads((student / "bksdm.json").read_text()))
    assert "8 of its 12 transformer modules moved onto the student (4 renumbered), 4 of removed blocks dropped" in \
        capsys.readouterr().err  # a note, once a process
    assert done["modules"] == 12 and done["remapped"] == 8 and len(done["dropped"]) == 4
    assert all(m.startswith("transformer_blocks.1.") for m in done["dropped"])
    file, after = load_file(lora), pipe.transformer.state_dict()
    for s_block, t_block in ((0, 0), (1, 2)):
        for target in TARGETS:
            t = f"transformer.transformer_blocks.{t_block}.{target}"
            key = f"transformer_blocks.{s_block}.{target}.weight"
            want = before[key] + file[t + ".lora_B.weight"] @ file[t + ".lora_A.weight"]
            torch.testing.assert_close(after[key], want, rtol=0, atol=1e-6)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {f"transformer_blocks.{b}.{t}.weight" for b in (0, 1) for t in TARGETS}

    capsys.readouterr()
    assert _generate(student, flow_models / "prompts.txt", tmp_path / "o", "--lora", str(lora)) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["lora"] == {"modules": 12, "remapped": 8,
                                                                                   "dropped": 4}
    assert _images(tmp_path / "o").keys() == {"00000.png", "00001.png"}
