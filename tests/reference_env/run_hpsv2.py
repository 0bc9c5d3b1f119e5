"""HPSv2 by the ``hpsv2`` package (``hpsv2.score``) with a checkpoint given on the command line.

Usage: python run_hpsv2.py make CKPT SEED   -> writes a random-weight checkpoint of hpsv2's own ViT-H-14
       python run_hpsv2.py score CKPT PAIRS_JSON -> prints {"hpsv2": [score per (image, prompt) pair]}
hpsv2 always asks its factory for 'laion2B-s32B-b79K' weights (a download) before loading the checkpoint over them;
here that one argument is None, every other argument is the package's.
"""

import json
import sys

import torch

import hpsv2.img_score as S

make_model = S.create_model_and_transforms


def offline_factory(name, pretrained, *args, **kwargs):
    return make_model(name, None, *args, **kwargs)


S.create_model_and_transforms = offline_factory
S.device = "cpu"
mode, ckpt = sys.argv[1:3]
if mode == "make":
    torch.manual_seed(int(sys.argv[3]))
    S.initialize_model()
    torch.save({"state_dict": S.model_dict["model"].state_dict()}, ckpt)
    print(json.dumps({"saved": ckpt, "tensors": len(S.model_dict["model"].state_dict())}))
else:
    pairs = json.load(open(sys.argv[3]))
    print(json.dumps({"hpsv2": [float(S.score(img, prompt, cp=ckpt)[0]) for img, prompt in pairs]}))
