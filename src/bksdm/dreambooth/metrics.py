"""DreamBooth metrics (appendix Table 4): DINO, CLIP-I and CLIP-T.

* DINO — ViT-S/16 DINO CLS-token cosine similarity, averaged over every (generated, real) image pair;
* CLIP-I — the same with CLIP image embeddings;
* CLIP-T — CLIP cosine between each generated image and its prompt, the identifier removed ("a dog in the snow").
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from bksdm.errors import UserError

DINO_DEFAULT = "facebook/dino-vits16"
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def dino_model(name_or_path: str = DINO_DEFAULT, device: str = "cpu"):
    """A transformers ``ViTModel`` (DINO ViT-S/16 by default) from a hub id or a local folder."""
    from transformers import ViTModel

    from bksdm.hub import MODEL_FILES, resolve_model

    try:
        path = resolve_model(name_or_path, "DINO model", MODEL_FILES)
    except UserError as exc:
        raise UserError(f"{exc} (or pass --dino-model FOLDER)") from None
    return ViTModel.from_pretrained(path, add_pooling_layer=False).to(device).eval()


def dino_inputs(images: list[Image.Image], size: int) -> torch.Tensor:
    """Resize the short side to 256/224 * size (bicubic), center-crop ``size``, ImageNet-normalise."""
    from torchvision.transforms import v2 as T

    tf = T.Compose([T.ToImage(), T.Resize(int(size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
                    T.CenterCrop(size), T.ToDtype(torch.float32, scale=True), T.Normalize(_MEAN, _STD)])
    return torch.stack([tf(im.convert("RGB")) for im in images])


@torch.no_grad()
def dino_embeddings(images: list[Image.Image], model, device: str = "cpu") -> torch.Tensor:
    """(N, D) L2-normalised CLS tokens."""
    x = dino_inputs(images, model.config.image_size).to(device)
    return F.normalize(model(pixel_values=x).last_hidden_state[:, 0].float(), dim=-1).cpu()


@torch.no_grad()
def clip_image_embeddings(images: list[Image.Image], model, preprocess, device: str = "cpu") -> torch.Tensor:
    x = torch.stack([preprocess(im.convert("RGB")) for im in images]).to(device)
    return F.normalize(model.encode_image(x).float(), dim=-1).cpu()


@torch.no_grad()
def clip_text_embeddings(texts: list[str], model, tokenizer, device: str = "cpu") -> torch.Tensor:
    return F.normalize(model.encode_text(tokenizer(texts).to(device)).float(), dim=-1).cpu()


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over all pairs of rows of two L2-normalised matrices."""
    return float((a @ b.T).mean())


def strip_identifier(prompt: str, identifier: str) -> str:
    return " ".join(w for w in prompt.split() if w != identifier)


def subject_scores(generated: list[Image.Image], prompts: list[str], real: list[Image.Image], dino, clip,
                   identifier: str = "sks", device: str = "cpu") -> dict[str, float]:
    """DINO, CLIP-I and CLIP-T of one subject's generated images (``prompts[i]`` made ``generated[i]``)."""
    model, preprocess, tokenizer = clip
    gen_c = clip_image_embeddings(generated, model, preprocess, device)
    real_c = clip_image_embeddings(real, model, preprocess, device)
    text_c = clip_text_embeddings([strip_identifier(p, identifier) for p in prompts], model, tokenizer, device)
    return {
        "dino": mean_pairwise_cosine(dino_embeddings(generated, dino, device), dino_embeddings(real, dino, device)),
        "clip_i": mean_pairwise_cosine(gen_c, real_c),
        "clip_t": float((gen_c * text_c).sum(-1).mean()),
    }


def load_images(paths: list[Path]) -> list[Image.Image]:
    """Generated images to score, through the shared opener (an unusable one is refused in one line)."""
    from bksdm.evaluate.metrics import opened

    return list(opened(paths))
