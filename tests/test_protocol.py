"""Protocol fidelity: `bksdm` evaluation equals the reference tools on the same files (random-weight networks of
the real architectures), and the 256 px copies are made the official way."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from bksdm.cli import main
from bksdm.mini.world import ShapesWorld
from tests.conftest import write_prompt_csv


def _coco_folder(root, n: int = 20, size: int = 64):
    """An official-looking im256 folder: ``COCO_val2014_*.jpg`` files (JPEG 75) and the prompt csv naming them."""
    world = ShapesWorld(seed=5)
    folder = root / "im256"
    folder.mkdir()
    rows = []
    for i in range(n):
        image, caption = world.sample(i)[:2]
        name = f"COCO_val2014_{i * 37:012d}.jpg"
        image.resize((size, size)).save(folder / name)
        rows.append((name, caption))
    return folder, rows




def test_inception_score_equals_torch_fidelity_whatever_the_row_order(metric_home, tmp_path, monkeypatch):
    """IS shuffles and splits by position: fed in torch-fidelity's own order it equals `fidelity --isc` on the
    folder, and shuffling the prompt file's rows does not change it. `.jpg` names are scored as given."""
    import torch_fidelity

    from bksdm.evaluate.weights import ISC_INCEPTION
    from bksdm.recipes.evaluate import evaluate

    monkeypatch.setenv("TORCH_HOME", str(metric_home))
    folder, rows = _coco_folder(tmp_path)
    ordered = evaluate(folder, write_prompt_csv(tmp_path / "a.csv", rows), ["is"], size=64)["is"]
    shuffled_rows = rows[:]
    random.Random(0).shuffle(shuffled_rows)
    assert shuffled_rows != rows
    shuffled = evaluate(folder, write_prompt_csv(tmp_path / "b.csv", shuffled_rows), ["is"], size=64)["is"]
    ref = torch_fidelity.calculate_metrics(input1=str(folder), isc=True, cuda=False, cache=False, verbose=False,
                                           feature_extractor_weights_path=str(metric_home / "hub" / "checkpoints" / ISC_INCEPTION))
    assert ordered == shuffled == ref["inception_score_mean"]


def test_fid_features_are_bit_identical_to_pytorch_fid(metric_home, tmp_path, monkeypatch):
    from pytorch_fid.fid_score import compute_statistics_of_path

    from bksdm.evaluate import metrics as M
    from bksdm.evaluate.weights import fid_inception

    monkeypatch.setenv("TORCH_HOME", str(metric_home))
    folder, _ = _coco_folder(tmp_path, n=6)
    model = fid_inception(None, "cpu")
    mu_ref, sigma_ref = compute_statistics_of_path(str(folder), model, 50, 2048, "cpu", num_workers=0)
    mu, sigma = M.folder_stats(folder, model, size=None)
    assert np.array_equal(mu, mu_ref) and np.array_equal(sigma, sigma_ref)


def test_fid_stats_follow_the_official_route_by_default(metric_home, tmp_path, monkeypatch):
    """Default: each real image resized with PIL's default filter and JPEG-75 re-encoded (the official
    val2014_im256 files, here made the official way on disk); --lossless: bicubic in memory, no JPEG."""
    from pytorch_fid.fid_score import compute_statistics_of_path

    from bksdm.evaluate.weights import fid_inception

    monkeypatch.setenv("TORCH_HOME", str(metric_home))
    world = ShapesWorld(seed=9)
    real, official = tmp_path / "val2014", tmp_path / "val2014_im256"
    real.mkdir()
    official.mkdir()
    for i in range(6):
        image = world.sample(i)[0].resize((80, 60))
        image.save(real / f"COCO_val2014_{i:012d}.jpg", quality=95)
        with Image.open(real / f"COCO_val2014_{i:012d}.jpg") as im:  # BK-SDM's change_img_size
            im.resize((48, 48)).save(official / f"COCO_val2014_{i:012d}.jpg")
    for flags, expect_equal in [([], True), (["--lossless"], False)]:
        out = tmp_path / f"stats{len(flags)}.npz"
        assert main(["fid-stats", "--images", str(real), "--out", str(out), "--size", "48", *flags]) == 0
        mu_ref, _ = compute_statistics_of_path(str(official), fid_inception(None, "cpu"), 50, 2048, "cpu", num_workers=0)
        with np.load(out) as f:
            assert np.array_equal(f["mu"], mu_ref) == expect_equal


def test_generated_copies_follow_the_official_route(tiny_teacher_dir, tmp_path):
    """Images keep the prompt file's .jpg names (JPEG 75); the small copy is the saved JPEG read back, resized
    with PIL's default filter and saved as JPEG: byte for byte what the official change_img_size writes."""
    rows = [(f"COCO_val2014_{i:012d}.jpg", ShapesWorld(seed=1).sample(i)[1]) for i in range(2)]
    prompts = write_prompt_csv(tmp_path / "p.csv", rows)
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(tiny_teacher_dir), "--prompts", str(prompts), "--out", str(out),
                 "--steps", "2", "--save-size", "16", "--dtype", "fp32"]) == 0
    for name, _ in rows:
        with Image.open(out / "images" / name) as im:
            assert im.format == "JPEG"
            im.resize((16, 16)).save(tmp_path / "official.jpg")
        assert (out / "images_16" / name).read_bytes() == (tmp_path / "official.jpg").read_bytes()
    lossless = tmp_path / "png"
    assert main(["generate", "--model", str(tiny_teacher_dir), "--prompts", str(prompts), "--out", str(lossless),
                 "--steps", "2", "--save-size", "16", "--dtype", "fp32", "--lossless"]) == 0
    names = sorted(p.name for p in (lossless / "images").iterdir())
    assert names == [n.replace(".jpg", ".png") for n, _ in rows]
    assert Image.open(lossless / "images" / names[0]).format == "PNG"
