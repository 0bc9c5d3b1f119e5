"""DreamBooth settings: one source of defaults for the API, YAML and the CLI (paper values, appendix Table 4)."""

from __future__ import annotations

from dataclasses import dataclass

from bksdm.config import Config
from bksdm.errors import UserError


@dataclass
class DreamBoothConfig(Config):
    model: str = ""  # pipeline folder or hub id to personalise (a teacher or one of our students)
    instance_dir: str = ""  # the subject's photos
    instance_prompt: str = ""  # e.g. "a sks dog"
    class_prompt: str = ""  # e.g. "a dog"; needed for prior preservation
    with_prior: bool = True  # paper: prior preservation on, weight 1
    prior_loss_weight: float = 1.0
    num_class_images: int = 200  # paper: 200 class images
    class_model: str = ""  # model that generates class images (default: the original teacher, else --model)
    class_dir: str = ""  # where class images live (default OUT/class_images); missing ones are generated
    class_steps: int = 25  # denoising steps for class images
    resolution: int = 512  # short side resized, then a random crop
    out: str = "dreambooth-out"
    max_steps: int = 800  # paper: 800 iterations
    batch_size: int = 1  # paper: 1
    lr: float = 0.0  # 0: paper default, 1e-6 full fine-tuning, 1e-4 LoRA
    lora: bool = False  # LoRA adapters (peft) instead of full fine-tuning
    lora_rank: int = 16
    train_text_encoder: bool = True  # paper: the text encoder is fine-tuned jointly
    gradient_checkpointing: bool = True
    mixed_precision: str = "fp16"  # no | fp16 (GPU) | bf16
    seed: int = 1234

    def validate(self) -> "DreamBoothConfig":
        if not self.model:
            raise UserError("no model: pass --model (a pipeline folder or hub id)")
        if not self.instance_prompt:
            raise UserError("no instance prompt: pass --instance-prompt, e.g. 'a sks dog'")
        if self.with_prior and not self.class_prompt:
            raise UserError("prior preservation needs --class-prompt (e.g. 'a dog'), or pass --with-prior false")
        import torch  # here, not at module level: the CLI builds its parser from this class without torch

        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            self.mixed_precision = "no"  # fp16 is a GPU default; on a CPU run in fp32 (or ask for bf16)
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr or (1e-4 if self.lora else 1e-6)
