"""ImageReward by the ``image-reward`` package (``ImageReward.score``) on random weights of its own network.

Usage: python run_imagereward.py CKPT TOKENIZER_DIR PAIRS_JSON SEED
  builds ImageReward(med_config) (BLIP ViT-L + BERT-base with cross-attention, the published config) under SEED,
  saves its state dict to CKPT, prints {"imagereward": [score per (image, prompt) pair]}.
The package's __init__ imports its training code (diffusers, datasets); only the scoring modules are loaded, and
its BertTokenizer.from_pretrained('bert-base-uncased') reads TOKENIZER_DIR (offline).
"""

import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

import torch

ckpt, tok_dir, pairs_file, seed = sys.argv[1:5]
root = Path(importlib.util.find_spec("ImageReward").submodule_search_locations[0])
pkg = types.ModuleType("ImageReward")
pkg.__path__ = [str(root)]
sys.modules["ImageReward"] = pkg  # skip ImageReward/__init__.py (training imports)

import ImageReward.models.BLIP.blip as blip  # noqa: E402

load_tokenizer = blip.BertTokenizer.from_pretrained
blip.BertTokenizer.from_pretrained = lambda name, *a, **k: load_tokenizer(tok_dir, *a, **k)
from ImageReward.ImageReward import ImageReward  # noqa: E402

med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
       "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
       "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
       "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768,
       "add_cross_attention": True}  # THUDM/ImageReward med_config.json
with tempfile.TemporaryDirectory() as tmp:
    (Path(tmp) / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(int(seed))
    model = ImageReward(med_config=str(Path(tmp) / "med_config.json"), device="cpu").eval()
# the package initialises its reward MLP with std 1/769 and zero biases: five such layers put every reward at
# -mean/std to 16 digits; unit-gain weights make the rewards differ between images, so the comparison means something
for layer in model.mlp.layers:
    if isinstance(layer, torch.nn.Linear):
        torch.nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
        torch.nn.init.normal_(layer.bias, std=0.1)
torch.save(model.state_dict(), ckpt)
pairs = json.load(open(pairs_file))
with torch.no_grad():
    print(json.dumps({"imagereward": [float(model.score(prompt, img)) for img, prompt in pairs]}))
