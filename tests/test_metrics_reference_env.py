"""bksdm's CMMD, HPSv2 and ImageReward equal the reference code itself on the same files and the same full-size
random weights. The references cannot be installed next to bksdm (tests/reference_env/README.md says why and how to
build their environment), so each runs under ``BKSDM_REFERENCE_PYTHON`` in a subprocess; opt in with
``RUN_REFERENCE_ENV=1`` (about 2 minutes on one CPU thread). The numbers are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bksdm.mini.world import ShapesWorld

pytestmark = pytest.mark.reference_env
HERE = Path(__file__).parent / "reference_env"


def _reference(script: str, *args) -> dict:
    python = os.environ.get("BKSDM_REFERENCE_PYTHON")
    if not python:
        pytest.fail("set BKSDM_REFERENCE_PYTHON to the reference environment's python (tests/reference_env/README.md)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    res = subprocess.run([python, str(HERE / script), *map(str, args)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """3 generated images (landscape, portrait, square) with prompts, and 4 reference images."""
    root = tmp_path_factory.mktemp("refenv")
    world = ShapesWorld(seed=11)
    (root / "gen").mkdir()
    (root / "ref").mkdir()
    out = []
    for i, size in enumerate([(64, 48), (40, 64), (56, 56)]):
        image, caption = world.sample(i)[:2]
        image.resize(size).save(root / "gen" / f"{i:03d}.png")
        out.append([str(root / "gen" / f"{i:03d}.png"), caption])
    for i in range(4):
        world.sample(100 + i)[0].resize((64, 48)).save(root / "ref" / f"{i:03d}.png")
    (root / "pairs.json").write_text(json.dumps(out))
    return root, out


def _images(pairs):
    return [Image.open(p).convert("RGB") for p, _ in pairs[1]], [c for _, c in pairs[1]]


def test_cmmd_equals_the_reference_code(pairs, tmp_path):
    from bksdm.evaluate import cmmd
    from bksdm.evaluate.registry import EvalInputs
    from tests.test_metrics_modern import clip336

    repo = os.environ.get("BKSDM_CMMD_REPO")
    if not repo:
        pytest.fail("set BKSDM_CMMD_REPO to a checkout of sayakpaul/cmmd-pytorch")
    root, _ = pairs
    folder = clip336(tmp_path / "clip", full=True)
    ref = _reference("run_cmmd.py", repo, folder, root / "ref", root / "gen", 1)["cmmd"]
    x = EvalInputs([], [], batch=2, cmmd_clip=str(folder))
    ours = cmmd.mmd(cmmd.folder_embeddings(root / "ref", x), cmmd.folder_embeddings(root / "gen", x))
    print(json.dumps({"cmmd": {"bksdm": ours, "reference": ref}}))
    assert ref > 0 and ours == pytest.approx(ref, rel=1e-5)


def test_hpsv2_equals_the_hpsv2_package(pairs, tmp_path):
    from bksdm.evaluate.preference import hpsv2_model, hpsv2_scores

    ckpt = tmp_path / "HPS_v2_compressed.pt"
    _reference("run_hpsv2.py", "make", ckpt, 0)  # the package's own ViT-H-14, random weights
    ref = _reference("run_hpsv2.py", "score", ckpt, pairs[0] / "pairs.json")["hpsv2"]
    model, tok = hpsv2_model(str(ckpt))
    ours = hpsv2_scores(*_images(pairs), model, tok, batch=3)
    print(json.dumps({"hpsv2": {"bksdm": ours.tolist(), "reference": ref}}))
    assert np.ptp(ref) > 1e-3 and np.allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_imagereward_equals_the_image_reward_package(pairs, tmp_path):
    from bksdm.evaluate import imagereward as IR
    from tests.test_metrics_modern import bert_vocab

    tok_dir = bert_vocab(tmp_path / "bert")
    ref = _reference("run_imagereward.py", tmp_path / "ImageReward.pt", tok_dir, pairs[0] / "pairs.json", 0)["imagereward"]
    ours = IR.scores(*_images(pairs), IR.model(str(tmp_path / "ImageReward.pt")), IR.tokenizer(str(tok_dir)), batch=3)
    print(json.dumps({"imagereward": {"bksdm": ours.tolist(), "reference": ref}}))
    assert np.ptp(ref) > 1e-3 and np.allclose(ours, ref, rtol=1e-5, atol=1e-6)
