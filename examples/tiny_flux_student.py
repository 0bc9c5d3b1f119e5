"""A Flux.1-dev-layout transformer student end to end on a tiny random pipeline, offline, in seconds on a CPU.

    python examples/tiny_flux_student.py --out runs/tiny-flux

Builds a random ``FluxPipeline`` (CLIP and T5 text encoders, guidance embedding, a transformer of 2 double-stream
and 3 single-stream blocks, a VAE of factor 2; the world's words as vocabulary) and runs the commands a real
FLUX.1-dev teacher takes: ``compress`` (bk-small), ``inspect``, ``cache``, ``distill`` from the cache (flow
matching: task + output KD + image-stream feature KD), ``generate`` from ``OUT/final``. Swap the folder for
``black-forest-labs/FLUX.1-dev`` (and a real dataset, ``--resolution 1024``) for the real thing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def tiny_flux(folder: Path, seed: int = 0) -> None:
    """Save a random Flux-dev-layout pipeline in ``folder`` (word-level CLIP tokenizer, a T5 tokenizer over the
    same words)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

    from bksdm.mini.model import make_tokenizer
    from bksdm.mini.world import WORDS

    torch.manual_seed(seed)
    clip_tok = make_tokenizer(WORDS, 10)
    t5_tok = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS],
                         extra_ids=0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
                                        eos_token_id=3, bos_token_id=2, pad_token_id=0))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=2,
                                 relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=3))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=8,
                                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                         guidance_embeds=True, axes_dims_rope=[2, 2, 4])
    vae = AutoencoderKL(block_out_channels=[4, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4, latent_channels=2,
                        sample_size=32, shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's VAE constants
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                            max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    FluxPipeline(transformer=transformer.eval(), scheduler=sched, vae=vae.eval(), text_encoder=clip.eval(), tokenizer=clip_tok,
                 text_encoder_2=t5.eval(), tokenizer_2=t5_tok).save_pretrained(folder)


def run(out: Path, steps: int = 20) -> Path:
    """Every command on the tiny teacher; returns the distilled pipeline folder (``OUT/run/final``)."""
    from bksdm.cli import main

    tiny_flux(out / "teacher")
    common = ["--resolution", "32", "--batch-size", "4", "--mixed-precision", "no", "--num-workers", "0",
              "report_to=none", "gradient_checkpointing=false", "--overwrite"]
    for argv in (["compress", "--teacher", str(out / "teacher"), "--student", "bk-small", "--out", str(out / "student"),
                  "--overwrite"],
                 ["inspect", str(out / "student")],
                 ["cache", "--teacher", str(out / "teacher"), "--data", "mini-world:32", "--out", str(out / "cache"),
                  "--resolution", "32", "--overwrite"],
                 ["distill", "--teacher", str(out / "teacher"), "--student", str(out / "student"), "--cache",
                  str(out / "cache"), "--out", str(out / "run"), "--max-steps", str(steps), "--grad-accum", "1",
                  "--lr", "1e-3", "caption_dropout=0.1", "weighting=cosmap", *common]):
        if main(argv) != 0:
            raise SystemExit(f"bksdm {argv[0]} failed")
    prompts = out / "prompts.txt"
    prompts.write_text("a red circle at the top left\na small blue square\n")
    if main(["generate", "--model", str(out / "run" / "final"), "--prompts", str(prompts), "--out", str(out / "images"),
             "--steps", "4", "--resolution", "32", "--dtype", "fp32", "--lossless"]) != 0:
        raise SystemExit("bksdm generate failed")
    return out / "run" / "final"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/tiny-flux"))
    p.add_argument("--steps", type=int, default=20, help="distillation steps")
    a = p.parse_args()
    print(f"distilled pipeline: {run(a.out, a.steps)}")
