"""The mini world's attribute classifier: what is drawn in each quadrant (kind or empty, colour, size).

A small CNN applied to each 16x16 quadrant of a 32x32 image; trained on world images with noise, blur and
colour-jitter augmentation so generated images (slightly soft, slightly noisy) are read fairly. Its 32-d
penultimate features of the four quadrants, concatenated (128-d), are the mini-FID feature space.

    python -m bksdm.mini.classifier            # trains and writes assets/classifier.safetensors (~1 min)
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bksdm.errors import UserError
from bksdm.mini.world import COLOURS, KINDS, POSITIONS, SIZES, Shape, ShapesWorld

ASSET = Path(__file__).parent / "assets" / "classifier.safetensors"
ASSET_SHA = ASSET.with_suffix(".sha256")
KIND_LABELS = ("empty", *KINDS)
COLOUR_LABELS = tuple(COLOURS)
SIZE_LABELS = tuple(SIZES)


class QuadrantNet(nn.Module):
    """(B, 3, 32, 32) in [-1, 1] -> per quadrant logits: kind (B, 4, 4), colour (B, 4, 5), size (B, 4, 2)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1, stride=2), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1, stride=2), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, width), nn.GELU(),
        )
        self.kind, self.colour, self.size = nn.Linear(width, len(KIND_LABELS)), nn.Linear(width, len(COLOUR_LABELS)), nn.Linear(width, len(SIZE_LABELS))

    @staticmethod
    def quadrants(x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B*4, 3, H/2, W/2) in POSITIONS order (top left, top right, bottom left, bottom right)."""
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        q = [x[..., :h, :w], x[..., :h, w:], x[..., h:, :w], x[..., h:, w:]]
        return torch.stack(q, 1).flatten(0, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 4 * width) penultimate features of the four quadrants."""
        return self.body(self.quadrants(x)).unflatten(0, (x.shape[0], 4)).flatten(1)

    def forward(self, x: torch.Tensor):
        f = self.body(self.quadrants(x)).unflatten(0, (x.shape[0], 4))
        return self.kind(f), self.colour(f), self.size(f)


def targets(scene: tuple[Shape, ...]) -> tuple[list[int], list[int], list[int]]:
    """Per-quadrant labels; colour and size are -100 (ignored) for empty quadrants."""
    kind, colour, size = [0] * 4, [-100] * 4, [-100] * 4
    for s in scene:
        q = POSITIONS.index(s.position)
        kind[q], colour[q], size[q] = KIND_LABELS.index(s.kind), COLOUR_LABELS.index(s.colour), SIZE_LABELS.index(s.size)
    return kind, colour, size


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise, blur and colour jitter of strength drawn per image."""
    b = x.shape[0]
    blur = torch.rand(b, 1, 1, 1, generator=gen)
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    x = x * (1 - blur) + F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3) * blur
    x = x + 0.1 * torch.randn(b, 3, 1, 1, generator=gen) + 0.12 * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return x.clamp(-1.2, 1.2)


def train(steps: int = 1500, batch: int = 64, seed: int = 0, out: Path = ASSET) -> dict:
    from safetensors.torch import save_file

    from bksdm.mini.teacher import to_tensor

    torch.manual_seed(seed)
    world, gen, net = ShapesWorld(seed=seed + 99), torch.Generator().manual_seed(seed), QuadrantNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for step in range(steps):
        samples = [world.sample(step * batch + i) for i in range(batch)]
        x = augment(to_tensor([s[0] for s in samples]), gen)
        tk, tc, ts = (torch.tensor(v) for v in zip(*[targets(s[2]) for s in samples]))
        lk, lc, ls = net(x)
        loss = F.cross_entropy(lk.flatten(0, 1), tk.flatten()) + F.cross_entropy(lc.flatten(0, 1), tc.flatten()) + \
            F.cross_entropy(ls.flatten(0, 1), ts.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 250 == 0:
            print(json.dumps({"step": step + 1, "loss": round(loss.item(), 4)}), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(out))
    out.with_suffix(".sha256").write_text(hashlib.sha256(out.read_bytes()).hexdigest())
    return {"loss": loss.item()}


def load(path: Path = ASSET) -> QuadrantNet:
    """The shipped classifier, after checking its sha256."""
    from safetensors.torch import load_file

    sha = path.with_suffix(".sha256")
    if not path.is_file() or not sha.is_file():
        raise UserError(f"mini-world classifier {path} is missing; run `python -m bksdm.mini.classifier`")
    if hashlib.sha256(path.read_bytes()).hexdigest() != sha.read_text().strip():
        raise UserError(f"mini-world classifier {path} is corrupt (sha256 mismatch); reinstall bksdm or retrain it")
    net = QuadrantNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


@torch.no_grad()
def predict(net: QuadrantNet, x: torch.Tensor) -> list[tuple[Shape, ...]]:
    """The scene each image shows, as read by the classifier (x: (B, 3, 32, 32) in [-1, 1])."""
    lk, lc, ls = net(x)
    k, c, s = lk.argmax(-1), lc.argmax(-1), ls.argmax(-1)
    scenes = []
    for b in range(x.shape[0]):
        scenes.append(tuple(Shape(KIND_LABELS[k[b, q]], COLOUR_LABELS[c[b, q]], SIZE_LABELS[s[b, q]], POSITIONS[q])
                            for q in range(4) if k[b, q] != 0))
    return scenes


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="train the mini-world attribute classifier")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--out", type=Path, default=ASSET)
    a = p.parse_args()
    torch.set_num_threads(1)
    print(train(a.steps, out=a.out))
