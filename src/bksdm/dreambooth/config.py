"""DreamBooth settings: one source of defaults for the API, YAML and the CLI (paper values, appendix Table 4), the
LoRA presets, and what diffusers' SD3 / Flux DreamBooth scripts fix for those families."""

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
                                   "init_lora_weights": "gaussian"},
                  # train_dreambooth_lora_sd3.py's default --lora_layers: both streams' attention projections
                  "sd3": {"lora_alpha": None, "init_lora_weights": "gaussian",
                          "target_modules": ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                                             "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]},
                  # train_dreambooth_lora_flux.py's: the same and both streams' feed-forward layers (--lora_alpha 4
                  # at --rank 4: alpha = rank)
                  "flux": {"lora_alpha": None, "init_lora_weights": "gaussian",
                           "target_modules": ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                                              "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                                              "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]}},
}
"""LoRA settings per preset and model (``unet`` for every U-Net family, ``text_encoder``, or a transformer family's
name: :func:`denoiser_key`); ``lora_alpha: None`` means alpha = rank. BK-SDM's run has no transformer, so
``bk-sdm`` has no ``sd3`` / ``flux`` entry."""

FLOW_SCRIPTS: dict[str, dict] = {
    # train_dreambooth_lora_sd3.py: --weighting_scheme logit_normal (sigma drawn logit-normal, loss weight 1),
    # --precondition_outputs 1 (the loss compares x0 = x_t - sigma * pred with the clean latents), T5 prompts of
    # --max_sequence_length 77 tokens (the pipeline samples with 256)
    "sd3": {"objective": {"density": "logit_normal"}, "precondition": True, "family": {"max_sequence_length": 77},
            "frozen_in_half": True},
    # train_dreambooth_lora_flux.py: --weighting_scheme none (u uniform, weight 1), sigma from the scheduler's
    # unshifted table (no resolution shift), velocity target noise - x0; T5 at 512 tokens and --guidance_scale 3.5
    # for Flux-dev: the family's own defaults; both scripts cast the frozen networks to the mixed-precision dtype
    "flux": {"objective": {"density": "uniform", "dynamic_shift": False}, "precondition": False, "family": {},
             "frozen_in_half": True},
}
"""What diffusers' DreamBooth script of a flow-matching family fixes: the :class:`bksdm.objectives.FlowObjective`
options, whether the loss is taken on preconditioned outputs (x0), family fields it sets otherwise than the
pipeline (``dataclasses.replace`` on the family), and whether LoRA runs hold the frozen networks in the autocast
dtype (both scripts cast them to ``weight_dtype`` and the adapters back to fp32). U-Net families: none (their scheduler's DDPM objective, plain MSE
on its target)."""


def denoiser_key(family) -> str:
    """The :data:`LORA_PRESETS` entry of ``family``'s denoiser: ``unet`` for every U-Net family, the family's name
    for a transformer (SD3's joint blocks and Flux's double / single blocks name their layers differently)."""
    return family.name if family.backbone == "transformer" else "unet"


def check_family(cfg: "DreamBoothConfig", family) -> None:
    """Options that do not apply to ``family``, refused in one line before any picture is read."""
    if family.backbone == "transformer" and cfg.train_text_encoder:
        raise UserError(f"{family.pipeline_class}: bksdm dreambooth trains the transformer only (the text encoders "
                        "stay frozen, as in diffusers' default); pass --no-train-text-encoder (or --config "
                        f"{family.name})")
    if cfg.lora and denoiser_key(family) not in LORA_PRESETS[cfg.lora_preset]:
        have = [p for p, parts in LORA_PRESETS.items() if denoiser_key(family) in parts]
        raise UserError(f"lora_preset {cfg.lora_preset} has no targets for {family.pipeline_class} (BK-SDM's run is "
                        f"for U-Nets); use --lora-preset {' or '.join(have)} (or --config {family.name})")


def lora_config(preset: str, model: str, rank: int):
    """The peft ``LoraConfig`` of ``preset`` for ``model`` (``unet``, ``text_encoder``, ``sd3`` or ``flux``)."""
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
    lora_preset: str = "bk-sdm"  # bk-sdm: finetune_lora.sh (to_q/to_v alpha 27, q_proj/v_proj alpha 17); diffusers (SD3 / Flux: only it)
    lora_rank: int = 16  # rank of every adapter (both presets: 16)
    train_text_encoder: bool = True  # paper: the text encoder is fine-tuned jointly (SD3 / Flux: refused, frozen)
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
