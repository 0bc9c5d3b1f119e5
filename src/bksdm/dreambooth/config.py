"""DreamBooth settings: one source of defaults for the API, YAML and the CLI (paper values, appendix Table 4)."""

from __future__ import annotations

from dataclasses import dataclass

from bksdm.config import Config
from bksdm.errors import UserError


LORA_PRESETS: dict[str, dict[str, dict]] = {
    # the official BK-SDM LoRA run (scripts/finetune_lora.sh, after peft's DreamBooth example): peft's default init
    "bk-sdm": {"unet": {"lora_alpha": 27, "target_modules": ["to_q", "to_v"], "init_lora_weights": True},
               "text_encoder": {"lora_alpha": 17, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": True}},
    # diffusers' train_dreambooth_lora.py: alpha = rank, Gaussian init, every attention projection
    "diffusers": {"unet": {"lora_alpha": None, "target_modules": ["to_k", "to_q", "to_v", "to_out.0"],
                           "init_lora_weights": "gaussian"},
                  "text_encoder": {"lora_alpha": None, "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"],
                                   "init_lora_weights": "gaussian"}},
}
"""LoRA settings per preset and model; ``lora_alpha: None`` means alpha = rank."""


def lora_config(preset: str, model: str, rank: int):
    """The peft ``LoraConfig`` of ``preset`` for ``model`` (``unet`` or ``text_encoder``)."""
    from peft import LoraConfig

    kw = dict(LORA_PRESETS[preset][model])
    kw["lora_alpha"] = kw["lora_alpha"] or rank
    return LoraConfig(r=rank, **kw)


@dataclass
class DreamBoothConfig(Config):
    model: str = ""  # pipeline folder or hub id to personalise (a teacher or one of our students)
    instance_dir: str = ""  # the subject's photos
    instance_prompt: str = ""  # e.g. "a sks dog"
    class_prompt: str = ""  # e.g. "a dog"; needed for prior preservation
    with_prior: bool = True  # paper: prior preservation on, weight 1
    prior_loss_weight: float = 1.0  # weight of the class images' loss
    num_class_images: int = 200  # paper: 200 class images
    class_model: str = ""  # model that generates class images (default: the original teacher, else --model)
    class_dir: str = ""  # where class images live (default OUT/class_images; missing ones are generated), or hf:DATASET
    class_image_column: str = "image"  # hf: class datasets: the image column (rows read in order, unreadable ones skipped)
    class_steps: int = 50  # denoising steps for class images (official run: the pipeline default, PNDM 50)
    resolution: int = 512  # short side resized, then a random crop
    out: str = "dreambooth-out"  # run folder: OUT/final (pipeline or LoRA file), finetune.json, class_images
    max_steps: int = 800  # paper: 800 iterations
    batch_size: int = 1  # paper: 1
    lr: float = 1e-6  # learning rate of full fine-tuning (paper, finetune_full.sh), constant
    lora: bool = False  # LoRA adapters (peft) instead of full fine-tuning
    lora_lr: float = 1e-4  # learning rate with --lora (finetune_lora.sh), constant
    lora_preset: str = "bk-sdm"  # bk-sdm: finetune_lora.sh (to_q/to_v alpha 27, q_proj/v_proj alpha 17); diffusers
    lora_rank: int = 16  # rank of every adapter (both presets: 16)
    train_text_encoder: bool = True  # paper: the text encoder is fine-tuned jointly
    gradient_checkpointing: bool = True  # official run: on (trades step time for memory)
    mixed_precision: str = "fp16"  # no | fp16 (needs a GPU) | bf16
    seed: int = 1234  # decides every random draw: data order, crops, noise, LoRA init

    def validate(self) -> "DreamBoothConfig":
        if not self.model:
            raise UserError("no model: pass --model (a pipeline folder or hub id)")
        if not self.instance_prompt:
            raise UserError("no instance prompt: pass --instance-prompt, e.g. 'a sks dog'")
        if self.lora_preset not in LORA_PRESETS:
            raise UserError(f"lora_preset={self.lora_preset!r}; choose from {', '.join(LORA_PRESETS)}")
        if self.with_prior and not self.class_prompt:
            raise UserError("prior preservation needs --class-prompt (e.g. 'a dog'), or turn it off with --no-with-prior (with_prior=false)")
        from bksdm.training import check_precision  # here: the CLI builds its parser from this class without torch

        check_precision(self.mixed_precision)
        return self

    @property
    def learning_rate(self) -> float:
        return self.lora_lr if self.lora else self.lr


def load_dreambooth_config(path: str | None, overrides: list[str] | None = None, **flags) -> DreamBoothConfig:
    """Defaults, then the YAML file (or ``paper``), then ``key=value`` overrides, then flags."""
    from bksdm.config import load_yaml_config

    return load_yaml_config(DreamBoothConfig, path, "dreambooth", overrides, **flags)
