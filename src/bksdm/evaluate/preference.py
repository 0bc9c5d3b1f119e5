"""Human-preference scores of each image for its own prompt: PickScore, HPSv2 and ImageReward, each from its
published checkpoint, per image and averaged.

* PickScore (Kirstain et al., "Pick-a-Pic", NeurIPS 2023; ``yuvalkirstain/PickScore_v1``, a CLIP ViT-H/14 fine-tune
  in transformers format, processor ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``): the procedure of the PickScore
  README, ``logit_scale.exp() * cos(image embedding, prompt embedding)`` (about 20-23 for real models).
* HPSv2 (Wu et al., "Human Preference Score v2", 2023; ``xswu/HPSv2`` ``HPS_v2_compressed.pt`` or
  ``HPS_v2.1_compressed.pt``, an OpenCLIP ViT-H/14 fine-tune): ``hpsv2.score``'s procedure, ``cos(image, prompt)``
  without the logit scale (about 0.27; the HPSv2 benchmark tables print it x 100). Its image transform is rebuilt
  here: RGB, ``ToTensor``, the longer side resized to 224 on the float tensor (torchvision bicubic, antialiased as
  torchvision >= 0.17 does by default), padded with 0 to 224 x 224 (left/top ``pad // 2``), then the OpenAI CLIP
  mean/std; the OpenCLIP ``ViT-H-14`` architecture and tokenizer are open_clip's, which load the checkpoint's keys.
* ImageReward (Xu et al., NeurIPS 2023): :mod:`bksdm.evaluate.imagereward`.

The prompt of every image is the prompt file's row that names it. All run in float32 (hpsv2 on a GPU runs under
autocast: its CUDA numbers differ from float32 by about 1e-3).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bksdm.errors import UserError, reading
from bksdm.evaluate.registry import EvalInputs, register

PICKSCORE, HPSV2 = "pickscore", "hpsv2"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPSV2_FILE = "HPS_v2_compressed.pt"  # hpsv2's default (v2.0); HPS_v2.1_compressed.pt is v2.1
HPSV2_REPO = "xswu/HPSv2"
HPSV2_ARCH = "ViT-H-14"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def require_prompts(texts: list[str], paths: list[Path], what: str) -> None:
    """Every image needs its prompt: one line naming the first image whose prompt is empty."""
    for t, p in zip(texts, paths):
        if not t or not t.strip():
            raise UserError(f"{what} scores an image against its prompt, but the prompt of {p.name} is empty; "
                            f"fill in its caption in the prompt file")
    if len(texts) != len(paths):
        raise UserError(f"{what}: {len(paths)} images but {len(texts)} prompts")


def record(x: EvalInputs, key: str, scores: np.ndarray) -> float:
    """Keep the (N,) per-image scores for ``--per-image`` and return their mean."""
    x.cache.setdefault("per_image", {})[key] = [float(s) for s in scores]
    return float(np.mean(scores))


# ---------------------------------------------------------------- PickScore
def pickscore_model(model: str = PICKSCORE_MODEL, processor: str = PICKSCORE_PROCESSOR, device: str = "cpu"):
    """(transformers ``CLIPModel``, ``CLIPProcessor``) from folders or hub ids; offline without them, one line
    naming the repository and the flag."""
    from transformers import AutoModel, AutoProcessor

    from bksdm.hub import resolve_model, resolve_weights_folder

    mdir = resolve_weights_folder(model, "PickScore model (pass --pickscore-model DIR)")
    pdir = resolve_model(processor, "PickScore processor (pass --pickscore-processor DIR)", ("*.json", "*.txt"))
    with reading(mdir, "PickScore model", f"download {PICKSCORE_MODEL} again and pass --pickscore-model DIR"):
        net = AutoModel.from_pretrained(mdir, dtype=torch.float32).to(device).eval()
    with reading(pdir, "PickScore processor", f"download {PICKSCORE_PROCESSOR} again and pass --pickscore-processor DIR"):
        proc = AutoProcessor.from_pretrained(pdir)
    return net, proc


@torch.no_grad()
def pickscores(images: list[Image.Image], prompts: list[str], net, proc, batch: int = 16,
               device: str = "cpu") -> np.ndarray:
    """(N,) PickScore of image i for prompt i: ``exp(logit_scale) * cos(get_image_features, get_text_features)``,
    inputs made by the processor as the PickScore README makes them (prompts padded, cut at 77 tokens)."""
    out = []
    for i in range(0, len(images), batch):
        im = proc(images=images[i:i + batch], return_tensors="pt").to(device)
        tx = proc(text=prompts[i:i + batch], padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
        fi = _features(net.get_image_features(**im))
        ft = _features(net.get_text_features(**tx))
        fi, ft = fi / torch.norm(fi, dim=-1, keepdim=True), ft / torch.norm(ft, dim=-1, keepdim=True)
        out.append((net.logit_scale.exp() * (fi * ft).sum(-1)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def _features(out) -> torch.Tensor:
    """``get_*_features`` return a tensor (transformers < 5) or an output whose ``pooler_output`` is it."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ---------------------------------------------------------------- HPSv2
def hpsv2_weights(given: str | None) -> Path:
    """The HPSv2 checkpoint: ``given`` (``--hpsv2-weights``), else hpsv2's own place (``$HPS_ROOT`` or
    ``~/.cache/hpsv2``), else the Hugging Face cache of ``xswu/HPSv2``; one line naming the file and flag."""
    from bksdm.evaluate.weights import checkpoint_file

    root = Path(os.environ.get("HPS_ROOT") or Path("~/.cache/hpsv2").expanduser())
    return checkpoint_file(given, root / HPSV2_FILE, HPSV2_REPO, HPSV2_FILE, "HPSv2", "--hpsv2-weights")


def hpsv2_model(weights: str | None = None, device: str = "cpu", arch: str = HPSV2_ARCH):
    """(open_clip ``arch`` (HPSv2: ViT-H-14) with the checkpoint's ``state_dict``, tokenizer)."""
    import open_clip

    path = hpsv2_weights(weights)
    with reading(path, "HPSv2 weights", "download it again (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt)"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        model = open_clip.create_model(arch, pretrained=None)
        model.load_state_dict(state)
    return model.to(device).eval(), open_clip.get_tokenizer(arch)


def hpsv2_transform(image: Image.Image, size: int = 224) -> torch.Tensor:
    """(3, size, size) input of hpsv2's validation transform (see the module docstring)."""
    import torchvision.transforms.functional as F

    x = F.to_tensor(image.convert("RGB"))
    h, w = x.shape[1:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        h, w = round(h * scale), round(w * scale)
        x = F.resize(x, [h, w], interpolation=F.InterpolationMode.BICUBIC, antialias=True)
    if (h, w) != (size, size):  # hpsv2 pads only after a resize: a 224 x 100 picture would crash its model
        ph, pw = size - h, size - w
        x = F.pad(x, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
    return F.normalize(x, CLIP_MEAN, CLIP_STD)


@torch.no_grad()
def hpsv2_scores(images: list[Image.Image], prompts: list[str], model, tokenizer, batch: int = 16,
                 device: str = "cpu") -> np.ndarray:
    """(N,) HPSv2 of image i for prompt i: the dot product of the normalised image and text features."""
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    out = []
    for i in range(0, len(images), batch):
        x = torch.stack([hpsv2_transform(im, size) for im in images[i:i + batch]]).to(device)
        fi = model.encode_image(x, normalize=True)
        ft = model.encode_text(tokenizer(prompts[i:i + batch]).to(device), normalize=True)
        out.append((fi * ft).sum(-1).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


@register(PICKSCORE, (PICKSCORE,), "PickScore (PickScore_v1, mean over images of exp(t) cos)", per_image=True)
def _pickscore(x: EvalInputs) -> dict[str, float]:
    from bksdm.evaluate import metrics as M

    require_prompts(x.texts, x.paths, "PickScore")
    net, proc = pickscore_model(x.pickscore_model, x.pickscore_processor, x.device)
    scores = pickscores(list(M.load_images(x.paths)), x.texts, net, proc, x.batch, x.device)
    return {PICKSCORE: record(x, PICKSCORE, scores)}


@register(HPSV2, (HPSV2,), "HPSv2 (HPS_v2_compressed.pt, mean cosine; tables print x100)", per_image=True)
def _hpsv2(x: EvalInputs) -> dict[str, float]:
    from bksdm.evaluate import metrics as M

    require_prompts(x.texts, x.paths, "HPSv2")
    model, tok = hpsv2_model(x.hpsv2_weights, x.device)
    scores = hpsv2_scores(list(M.load_images(x.paths)), x.texts, model, tok, x.batch, x.device)
    return {HPSV2: record(x, HPSV2, scores)}
