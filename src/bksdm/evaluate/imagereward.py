"""ImageReward (Xu et al., "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image Generation",
NeurIPS 2023) from its published checkpoint ``THUDM/ImageReward`` ``ImageReward.pt``, without its package.

The ``image-reward`` package pins ``timm==0.6.13`` and a BLIP text encoder written against transformers 4 (both
conflict with ours), so its network is rebuilt here from transformers' BLIP classes, which hold the same layers:

* image: ``Resize(224, bicubic)`` of the shorter side, ``CenterCrop(224)``, RGB, ``ToTensor``, OpenAI CLIP mean/std;
  BLIP's ViT-L/16 (24 blocks, width 1024, 16 heads, LayerNorm eps 1e-6) -> (B, 197, 1024) = ``BlipVisionModel``;
* prompt: BERT ``bert-base-uncased`` tokens padded to 35 (``[CLS] ... [SEP]``, cut at 35);
* BLIP's text encoder (BERT-base, 12 layers, width 768, cross-attention on every layer to the image tokens)
  = ``BlipTextModel`` without pooler, not causal; its ``[CLS]`` output (B, 768) -> the reward MLP
  (768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations) -> ``(r - 0.16717362830052426) / 1.0333394966054072``.

Checkpoint keys map one to one (:func:`checkpoint_map`; every key and shape asserted). Equality with the package on
the same random weights is recorded in docs/benchmarks.md (run in a separate environment with its pins).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from bksdm.errors import UserError, reading
from bksdm.evaluate.registry import EvalInputs, register

IMAGEREWARD = "imagereward"
IMAGEREWARD_FILE = "ImageReward.pt"
IMAGEREWARD_REPO = "THUDM/ImageReward"
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072  # the package's normalisation
MAX_TOKENS = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
              patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu")  # BLIP 'large' ViT
TEXT = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            encoder_hidden_size=1024, max_position_embeddings=512, layer_norm_eps=1e-12, hidden_act="gelu",
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # med_config.json (BERT-base + 2 tokens)


class ImageRewardNet(nn.Module):
    """BLIP ViT + cross-attending BERT + reward MLP; ``vision``/``text`` replace :data:`VISION`/:data:`TEXT`
    (the published checkpoint needs those)."""

    def __init__(self, vision: dict | None = None, text: dict | None = None):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        self.vision = BlipVisionModel(BlipVisionConfig(**(vision or VISION)))
        # is_decoder=True in the config only makes BlipTextLayer build its cross-attention; forward runs it with
        # is_decoder=False (bidirectional self-attention, as the package's BertModel encoder)
        self.text = BlipTextModel(BlipTextConfig(**(text or TEXT), is_decoder=True), add_pooling_layer=False)
        width = self.text.config.hidden_size
        # indices as the package's nn.Sequential (dropouts at 1, 3, 5), so its keys load unchanged
        self.mlp = nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                 nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) rewards of (B, 3, 224, 224) normalised images for (B, 35) prompt tokens."""
        image = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                        encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state
        return ((self.mlp(out[:, 0, :].float()) - REWARD_MEAN) / REWARD_STD).squeeze(-1)


def checkpoint_map(net: ImageRewardNet, blocks: int) -> dict[str, str]:
    """``ImageReward.pt`` key -> :class:`ImageRewardNet` key, for every tensor the score uses."""
    m = {"blip.visual_encoder.cls_token": "vision.embeddings.class_embedding",
         "blip.visual_encoder.pos_embed": "vision.embeddings.position_embedding",
         "blip.visual_encoder.patch_embed.proj.weight": "vision.embeddings.patch_embedding.weight",
         "blip.visual_encoder.patch_embed.proj.bias": "vision.embeddings.patch_embedding.bias",
         "blip.visual_encoder.norm.weight": "vision.post_layernorm.weight",
         "blip.visual_encoder.norm.bias": "vision.post_layernorm.bias"}
    for i in range(blocks):
        for theirs, ours in [("norm1", "layer_norm1"), ("attn.qkv", "self_attn.qkv"), ("attn.proj", "self_attn.projection"),
                             ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]:
            for p in ("weight", "bias"):
                m[f"blip.visual_encoder.blocks.{i}.{theirs}.{p}"] = f"vision.encoder.layers.{i}.{ours}.{p}"
    for k in net.text.state_dict():
        if not k.endswith("position_ids"):
            m[f"blip.text_encoder.{k}"] = f"text.{k}"
    for k in net.mlp.state_dict():
        m[f"mlp.layers.{k}"] = f"mlp.{k}"
    return m


def load_checkpoint(net: ImageRewardNet, state: dict[str, torch.Tensor]) -> ImageRewardNet:
    """Copy the package's state dict into ``net`` key by key; a missing key or a wrong shape is one line."""
    mapping = checkpoint_map(net, net.vision.config.num_hidden_layers)
    own = net.state_dict()
    missing = [k for k in mapping if k not in state]
    if missing:
        raise UserError(f"not an ImageReward checkpoint: {len(missing)} tensors missing (first {missing[0]})")
    new = {}
    for theirs, ours in mapping.items():
        if tuple(state[theirs].shape) != tuple(own[ours].shape):
            raise UserError(f"ImageReward checkpoint tensor {theirs} has shape {tuple(state[theirs].shape)}, "
                            f"expected {tuple(own[ours].shape)}")
        new[ours] = state[theirs]
    left = set(own) - set(new)
    assert all(k.endswith("position_ids") for k in left), sorted(left)[:3]
    net.load_state_dict(new, strict=False)
    return net


def weights_file(given: str | None) -> Path:
    """``given`` (``--imagereward-weights``), else the package's download place (``~/.cache/ImageReward``), else
    the Hugging Face cache of ``THUDM/ImageReward``; one line naming the file and flag."""
    from bksdm.evaluate.weights import checkpoint_file

    own = Path("~/.cache/ImageReward").expanduser() / IMAGEREWARD_FILE
    return checkpoint_file(given, own, IMAGEREWARD_REPO, IMAGEREWARD_FILE, "ImageReward", "--imagereward-weights")


def tokenizer(name: str = "bert-base-uncased"):
    """BERT's uncased WordPiece tokenizer (the package adds ``[DEC]``/``[ENC]``, which a prompt never produces)."""
    from transformers import BertTokenizer

    from bksdm.hub import resolve_model

    folder = resolve_model(name, "ImageReward's BERT tokenizer (pass --imagereward-tokenizer DIR)", ("*.json", "*.txt"))
    with reading(folder, "ImageReward tokenizer", "download bert-base-uncased again"):
        return BertTokenizer.from_pretrained(folder)


def model(weights: str | None = None, device: str = "cpu") -> ImageRewardNet:
    """The ImageReward network with the checkpoint's weights (:func:`weights_file`), key by key and shape-checked,
    in eval mode on ``device``."""
    path = weights_file(weights)
    net = ImageRewardNet()
    with reading(path, "ImageReward weights", "download ImageReward.pt again"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        state = state.get("state_dict", state)
    return load_checkpoint(net, state).to(device).eval()


def transform(image, size: int = 224) -> torch.Tensor:
    """(3, size, size) input: the package's ``_transform`` (shorter side to ``size`` bicubic, centre crop)."""
    from torchvision import transforms as T

    t = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                   T.Normalize(CLIP_MEAN, CLIP_STD)])
    return t(image.convert("RGB"))


@torch.no_grad()
def scores(images: list, prompts: list[str], net: ImageRewardNet, tok, batch: int = 16, device: str = "cpu") -> np.ndarray:
    """(N,) ImageReward of image i for prompt i."""
    size = net.vision.config.image_size
    out = []
    for i in range(0, len(images), batch):
        x = torch.stack([transform(im, size) for im in images[i:i + batch]]).to(device)
        t = tok(prompts[i:i + batch], padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        out.append(net(x, t.input_ids.to(device), t.attention_mask.to(device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


@register(IMAGEREWARD, (IMAGEREWARD,), "ImageReward (ImageReward.pt, BLIP, mean normalised reward)", per_image=True)
def _imagereward(x: EvalInputs) -> dict[str, float]:
    from bksdm.evaluate import metrics as M
    from bksdm.evaluate.preference import record, require_prompts

    require_prompts(x.texts, x.paths, "ImageReward")
    tok = tokenizer(x.imagereward_tokenizer)  # both files found before the network is built
    net = model(x.imagereward_weights, x.device)
    s = scores(list(M.load_images(x.paths)), x.texts, net, tok, x.batch, x.device)
    return {IMAGEREWARD: record(x, IMAGEREWARD, s)}
