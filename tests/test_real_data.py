"""Real data in: the pictures, caption files and metric inputs users really have, read right or refused by name.

Every fixture is a file as a phone, an editor, Excel, macOS or webdataset writes it, built here with PIL; every
room that reads pictures (image folders, tar shards, ``hf:`` datasets, DreamBooth, metrics) reads them through
``bksdm.images.open_image`` and is checked to give the same pixels.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
import time

import numpy as np
import torch
import pytest
from PIL import Image

from bksdm.cli import build_parser, main
from bksdm.images import BACKGROUND, open_image
from bksdm.mini.world import ShapesWorld
from bksdm.skips import Skips, Unusable
from tests.conftest import FAST, one_line_error


def _scene(i: int = 0, size: tuple[int, int] = (64, 48)) -> Image.Image:
    return ShapesWorld(seed=3).sample(i)[0].resize(size, Image.NEAREST)


def _gray16() -> tuple[Image.Image, np.ndarray]:
    """A 16-bit grayscale ramp (as medical, scientific and some scanner software write PNGs) and its 8-bit truth."""
    a = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64,491
    return Image.fromarray(a), np.round(a / 257).astype(np.uint8)


def _exif_rotated(path):
    """A phone picture: 64x48 pixels stored, EXIF orientation 6 (rotate 90 degrees clockwise to view)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    _scene().save(path, exif=exif)
    return path


def _transparent() -> Image.Image:
    """A cut-out: shapes on a fully transparent background whose hidden colour is black (as editors store it)."""
    rgb = np.asarray(_scene())
    alpha = np.where((rgb == rgb[0, 0]).all(-1), 0, 255).astype(np.uint8)
    alpha[:, :8] = 128  # a half-transparent band
    rgba = np.dstack([np.where(alpha[..., None] == 0, 0, rgb), alpha])
    return Image.fromarray(rgba.astype(np.uint8), "RGBA")


def _composited(rgba: Image.Image) -> np.ndarray:
    a = np.asarray(rgba).astype(np.float64)
    alpha = a[..., 3:] / 255
    return np.round(a[..., :3] * alpha + np.array(BACKGROUND) * (1 - alpha)).astype(np.uint8)


# ------------------------------------------------------------------ the opener's policy


def test_open_image_maps_every_mode_by_its_value_range(tmp_path):
    gray, truth = _gray16()
    gray.save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"  # what Pillow gives for a 16-bit PNG
        assert (np.asarray(im.convert("RGB")) == 255).mean() > 0.99  # the bug: Pillow's own conversion clips
    got = np.asarray(open_image(tmp_path / "g16.png"))
    assert got.shape == (48, 64, 3) and np.array_equal(got[..., 0], truth) and np.array_equal(got[..., 2], truth)
    # 32-bit integer pixels holding 16-bit values, and float pixels in 0..1
    assert np.array_equal(np.asarray(open_image(Image.fromarray(truth.astype(np.int32) * 257)))[..., 1], truth)
    f = Image.fromarray((truth / 255).astype(np.float32), "F")
    assert np.abs(np.asarray(open_image(f))[..., 0].astype(int) - truth).max() <= 1
    for bad in (Image.fromarray(np.full((4, 4), 70_000, np.int32)), Image.fromarray(np.full((4, 4), 2.0, np.float32))):
        with pytest.raises(Unusable) as e:
            open_image(bad)
        assert e.value.reason == "unsupported pixels"
    # an ordinary 8-bit picture is read exactly as Pillow's convert("RGB") reads it (metrics stay the reference's)
    for mode in ("RGB", "L", "P", "CMYK"):
        im = _scene().convert(mode)
        assert np.array_equal(np.asarray(open_image(im)), np.asarray(im.convert("RGB")))


def test_open_image_applies_orientation_and_composites_transparency(tmp_path):
    stored = _scene()
    rotated = open_image(_exif_rotated(tmp_path / "phone.png"))
    assert rotated.size == (48, 64)  # upright: taller than wide
    assert np.array_equal(np.asarray(rotated), np.asarray(stored.transpose(Image.Transpose.ROTATE_270)))
    rgba = _transparent()
    got = np.asarray(open_image(rgba))
    assert np.array_equal(got, _composited(rgba))
    assert (got[np.asarray(rgba)[..., 3] == 0] == 255).all()  # white, not the black stored under alpha 0
    # a palette picture with a transparent index, as GIFs and optimised PNGs store it
    p = _scene().convert("P")
    p.info["transparency"] = int(np.asarray(p)[0, 0])
    assert tuple(np.asarray(open_image(p))[0, 0]) == BACKGROUND


def test_open_image_refuses_by_reason(tmp_path, monkeypatch):
    import bksdm.images as I
    from bksdm.images import check_crop

    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS resource fork beside a.png
    cases = {"not an image": tmp_path / "._a.png", "missing file": tmp_path / "nope.png"}
    buf = io.BytesIO()
    _scene().save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:200])
    cases["truncated or corrupt"] = tmp_path / "cut.png"
    for reason, path in cases.items():
        with pytest.raises(Unusable) as e:
            open_image(path)
        assert e.value.reason == reason, path
    monkeypatch.setattr(I, "MAX_PIXELS", 1000)  # our limit, checked before decoding
    with pytest.raises(Unusable, match="too large"):
        open_image(buf.getvalue())
    monkeypatch.setattr(I, "MAX_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's own bomb error (2x its limit) is caught too
    with pytest.raises(Unusable, match="too large"):
        open_image(buf.getvalue())
    with pytest.raises(Unusable, match="too thin"):
        check_crop((4000, 2), 512)
    with pytest.raises(Unusable, match="too small"):
        check_crop((40, 30), 512)
    check_crop((640, 480), 512)  # an ordinary photo passes


# ------------------------------------------------------------------ every room reads the same pixels


def _tricky(tmp_path):
    """(file name, bytes, expected RGB array) of a 16-bit PNG, a phone JPEG-like EXIF picture and a cut-out."""
    out = []
    gray, truth = _gray16()
    b = io.BytesIO()
    gray.save(b, format="PNG")
    out.append(("g16.png", b.getvalue(), np.repeat(truth[..., None], 3, -1)))
    path = _exif_rotated(tmp_path / "phone.png")
    out.append(("phone.png", path.read_bytes(), np.asarray(_scene().transpose(Image.Transpose.ROTATE_270))))
    rgba = _transparent()
    b = io.BytesIO()
    rgba.save(b, format="PNG")
    out.append(("cut.png", b.getvalue(), _composited(rgba)))
    return out


def test_every_room_reads_the_same_pixels(tmp_path):
    """Image folder, webdataset tar, hf: parquet, DreamBooth subject folder and the metrics' reader: one opener."""
    import datasets

    from bksdm.distill.data import open_source
    from bksdm.dreambooth.dataset import load_subject_images
    from bksdm.evaluate.metrics import opened

    items = _tricky(tmp_path)
    folder, subject = tmp_path / "folder", tmp_path / "subject"
    folder.mkdir()
    subject.mkdir()
    for name, data, _ in items:
        (folder / name).write_bytes(data)
        (subject / name).write_bytes(data)
    with open(folder / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file_name", "text"), *[(n, f"caption {n}") for n, _, _ in items]])
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for i, (name, data, _) in enumerate(items):
            for member, payload in ((f"{i:06d}.png", data), (f"{i:06d}.txt", f"caption {name}".encode())):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    datasets.Dataset.from_dict({"image": [{"bytes": d, "path": None} for _, d, _ in items],
                                "text": [f"caption {n}" for n, _, _ in items]},
                               features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
                               ).to_parquet(str(tmp_path / "data.parquet"))
    want = [w for _, _, w in items]
    rooms = {}
    src = open_source(str(folder))
    rooms["folder"] = [np.asarray(src.get(i)[0]) for i in range(len(src))]
    tar = open_source(str(tmp_path / "shard.tar"))
    stream = tar.samples()
    rooms["webdataset"] = [np.asarray(tar.decode(next(stream))[0]) for _ in items]
    hf = open_source(f"hf:{tmp_path / 'data.parquet'}")
    rooms["hf"] = [np.asarray(hf.get(i)[0]) for i in range(len(hf))]
    order = sorted(range(len(items)), key=lambda i: items[i][0])  # subject folders and metrics read by name
    rooms["dreambooth"] = [np.asarray(im) for im in load_subject_images(subject)]
    rooms["metrics"] = [np.asarray(im) for im in opened(sorted(subject.iterdir()))]
    for room, got in rooms.items():
        expected = [want[i] for i in order] if room in ("dreambooth", "metrics") else want
        assert len(got) == len(expected), room
        for g, w in zip(got, expected):
            assert g.shape == w.shape and np.array_equal(g, w), room


# ------------------------------------------------------------------ data sources say what they dropped and why


def _folder(tmp_path, name="data", n=6, extra=()):
    data = tmp_path / name
    data.mkdir()
    rows = []
    for i in range(n):
        image, text, _ = ShapesWorld().sample(i)
        image.save(data / f"{i}.png")
        rows.append((f"{i}.png", text))
    for fname, image in extra:
        image.save(data / fname) if isinstance(image, Image.Image) else (data / fname).write_bytes(image)
        rows.append((fname, "a picture"))
    return data, rows


def test_distill_counts_skipped_items_by_reason_in_summary_and_model_card(tiny_teacher_dir, tmp_path, capsys):
    data, rows = _folder(tmp_path, n=5, extra=[("thin.png", Image.new("RGB", (4000, 2), "red")),
                                               ("broken.png", b"not a png"), ("speck.png", Image.new("RGB", (2, 2)))])
    with open(data / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file_name", "text"), *rows])
    out = tmp_path / "run"
    # 8 items, 2 steps of 4: exactly one epoch, so each unusable item is drawn (and counted) once
    assert main(["distill", "--teacher", str(tiny_teacher_dir), "--data", str(data), "--out", str(out),
                 "--max-steps", "2", "--grad-accum", "1", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "data: 3 skipped:" in printed and "1 too thin" in printed and "1 not an image" in printed
    assert "1 too small" in printed
    card = (out / "final" / "README.md").read_text()
    assert "unusable samples skipped: 3 skipped: 1 not an image, 1 too small, 1 too thin" in card
    record = json.loads((out / "final" / "bksdm.json").read_text())
    assert record["distill"]["skipped"] == {"too thin": 1, "not an image": 1, "too small": 1}


def test_cache_records_reasons_and_distill_reads_them_back(tiny_teacher_dir, tmp_path, capsys):
    from bksdm.distill.cache import CacheSource

    data, rows = _folder(tmp_path, extra=[("thin.png", Image.new("RGB", (400, 2), "red"))])
    with open(data / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file_name", "text"), *rows])
    assert main(["cache", "--teacher", str(tiny_teacher_dir), "--data", str(data), "--out", str(tmp_path / "c"),
                 "--resolution", "32"]) == 0
    assert "cached 6 of 7 items (1 skipped: 1 too thin" in capsys.readouterr().out
    with pytest.raises(Unusable) as e:
        CacheSource(tmp_path / "c").item(6, False)
    assert e.value.reason == "too thin"


def test_jsonl_with_caption_key_is_read_and_said(tiny_teacher_dir, tmp_path, capsys):
    from bksdm.distill.data import open_source

    data, rows = _folder(tmp_path)
    with open(data / "metadata.jsonl", "w") as f:
        for name, text in rows:
            f.write(json.dumps({"file_name": name, "caption": text}) + "\n")
    src = open_source(str(data))
    assert [src.get(i)[1] for i in range(len(src))] == [t for _, t in rows]  # not empty captions
    assert "has no 'text' column; reading captions from 'caption'" in capsys.readouterr().err
    # a row without its caption is skipped with that reason, not trained as an empty caption
    with open(data / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "0.png"}) + "\n")
    with pytest.raises(Unusable, match="no caption"):
        open_source(str(data)).get(len(rows))
    capsys.readouterr()
    # no caption column at all: one line naming what is there and the option
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "desc": t}) + "\n" for n, t in rows))
    assert main(["distill", "--teacher", str(tiny_teacher_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--max-steps", "1", *FAST]) == 2
    err = one_line_error(capsys)
    assert "no caption column 'text' (it has file_name, desc)" in err and "caption_column=" in err
    # naming it works
    src = open_source(str(data), caption_column="desc")
    assert src.get(0)[1] == rows[0][1]


def test_byte_order_mark_csv_reads_as_utf8(tmp_path):
    from bksdm.distill.data import open_source
    from bksdm.generate import read_prompts

    data, rows = _folder(tmp_path, n=3)
    with open(data / "metadata.csv", "w", newline="", encoding="utf-8-sig") as f:  # Excel's "CSV UTF-8"
        csv.writer(f).writerows([("file_name", "text"), *[(n, t + " ü") for n, t in rows]])
    src = open_source(str(data))
    assert src.get(0)[1] == rows[0][1] + " ü"
    prompts = tmp_path / "prompts.csv"
    with open(prompts, "w", newline="", encoding="utf-8-sig") as f:
        csv.writer(f).writerows([("file_name", "caption"), ("a.jpg", "a red circle")])
    assert read_prompts(prompts) == [("a.jpg", "a red circle")]


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _png(i):
    b = io.BytesIO()
    ShapesWorld().sample(i)[0].save(b, format="PNG")
    return b.getvalue()


def test_webdataset_names_with_dots_are_read_and_said(tiny_teacher_dir, tmp_path, capsys):
    from bksdm.distill.data import open_source

    dotted = [(f"img.{i:03d}.{e}", _png(i) if e == "png" else f"caption {i}".encode()) for i in range(4)
              for e in ("png", "txt")]
    src = open_source(str(_tar(tmp_path / "dotted.tar", dotted)))
    stream = src.samples()
    got = [src.decode(next(stream)) for _ in range(4)]
    assert [t for _, t in got] == [f"caption {i}" for i in range(4)]
    assert all(np.array_equal(np.asarray(im), np.asarray(ShapesWorld().sample(i)[0])) for i, (im, _) in enumerate(got))
    assert "sample names contain dots (img.000.png)" in capsys.readouterr().err
    # half dotted, half plain: every sample read
    mixed = [(f"{i:06d}.{e}", _png(i) if e == "png" else b"plain") for i in range(2) for e in ("png", "txt")] + dotted
    src = open_source(str(_tar(tmp_path / "mixed.tar", mixed)))
    stream = src.samples()
    assert [src.decode(next(stream))[1] for _ in range(6)] == ["plain", "plain"] + [f"caption {i}" for i in range(4)]
    # end to end: distillation on the dotted shard skips nothing
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(tiny_teacher_dir), "--data", str(tmp_path / "dotted.tar"), "--out",
                 str(out), "--max-steps", "2", "--grad-accum", "1", *FAST]) == 0
    assert "none skipped" in (out / "final" / "README.md").read_text()
    # a sample without a caption member is skipped with that reason
    src = open_source(str(_tar(tmp_path / "nocap.tar", [("a.png", _png(0))])))
    with pytest.raises(Unusable, match="no caption"):
        src.decode(next(src.samples()))


def test_hf_rows_with_chained_paths_are_decoded_as_datasets_decodes_them(tmp_path):
    """A cell holding only a path into an archive (``zip://a.png::/x/imgs.zip``, as ``datasets`` stores images of
    archives it has not extracted): ``datasets`` decodes it, so bksdm does too, instead of skipping every row."""
    import zipfile

    import datasets

    from bksdm.distill.data import open_source

    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as z:
        for i in range(3):
            z.writestr(f"{i}.png", _png(i))
    paths = [f"zip://{i}.png::{tmp_path / 'imgs.zip'}" for i in range(3)]
    datasets.Dataset.from_dict({"image": [{"bytes": None, "path": p} for p in paths], "text": ["a", "b", "c"]},
                               features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
                               ).to_parquet(str(tmp_path / "d.parquet"))
    src = open_source(f"hf:{tmp_path / 'd.parquet'}")
    for i in range(3):
        image, text = src.get(i)
        reference = datasets.Image().decode_example({"bytes": None, "path": paths[i]})
        assert np.array_equal(np.asarray(image), np.asarray(reference.convert("RGB")))
        assert np.array_equal(np.asarray(image), np.asarray(ShapesWorld().sample(i)[0]))
    # a path that cannot be fetched is skipped with its reason (written with pyarrow: datasets refuses to write it)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [{"bytes": None, "path": f"zip://9.png::{tmp_path / 'imgs.zip'}"}], "text": ["x"]}),
                   tmp_path / "bad.parquet")
    with pytest.raises(Unusable) as e:
        open_source(f"hf:{tmp_path / 'bad.parquet'}").get(0)
    assert e.value.reason in ("missing file", "cannot be fetched")


# ------------------------------------------------------------------ metrics refuse what they cannot measure


def _gen_folder(tmp_path, n, name="gen", size=(32, 32)):
    folder = tmp_path / name
    folder.mkdir()
    for i in range(n):
        ShapesWorld(seed=2).sample(i)[0].resize(size).save(folder / f"{i:05d}.png")
    prompts = tmp_path / f"{name}.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(n)))
    return folder, prompts


def test_fid_of_too_few_images_is_refused_at_once(tmp_path, capsys, metric_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(metric_home))
    real, _ = _gen_folder(tmp_path, 3, "real")
    one, prompts = _gen_folder(tmp_path, 1)
    t0 = time.time()
    assert main(["evaluate", "--images", str(one), "--prompts", str(prompts), "--metrics", "fid", "--fid-ref",
                 str(real), "--size", "64"]) == 2
    assert time.time() - t0 < 20  # it used to hang in LAPACK on an all-NaN covariance
    assert "FID needs at least 2 images" in one_line_error(capsys)
    # fid-stats of one picture writes nothing
    assert main(["fid-stats", "--images", str(one), "--out", str(tmp_path / "one.npz"), "--size", "64"]) == 2
    assert "at least 2 images" in one_line_error(capsys) and not (tmp_path / "one.npz").exists()
    # three images: computed, with a note that says what the number is worth
    three, prompts3 = _gen_folder(tmp_path, 3, "three")
    assert main(["evaluate", "--images", str(three), "--prompts", str(prompts3), "--metrics", "fid", "--fid-ref",
                 str(real), "--size", "64"]) == 0
    captured = capsys.readouterr()
    assert "covariance is singular" in captured.err and '"fid"' in captured.out
    # IS: 2 images per split
    assert main(["evaluate", "--images", str(three), "--prompts", str(prompts3), "--metrics", "is"]) == 2
    assert "IS needs at least 20 images" in one_line_error(capsys)


def test_non_finite_statistics_are_refused_never_stored_never_hang(tmp_path, capsys, metric_home, monkeypatch):
    from bksdm.evaluate import metrics as M

    monkeypatch.setenv("TORCH_HOME", str(metric_home))
    np.savez(tmp_path / "nan.npz", mu=np.full(2048, np.nan), sigma=np.full((2048, 2048), np.nan))
    one, prompts = _gen_folder(tmp_path, 2)
    assert main(["evaluate", "--images", str(one), "--prompts", str(prompts), "--metrics", "fid", "--fid-ref",
                 str(tmp_path / "nan.npz")]) == 2
    assert "not finite" in one_line_error(capsys)
    t0 = time.time()
    with pytest.raises(Exception, match="not finite"):
        M.frechet_distance(np.zeros(512), np.full((512, 512), np.nan), np.zeros(512), np.eye(512))
    assert time.time() - t0 < 5
    with pytest.raises(Exception, match="not finite"):
        M.save_stats(tmp_path / "x.npz", np.zeros(4), np.full((4, 4), np.inf))
    assert not (tmp_path / "x.npz").exists()


def test_frechet_distance_is_pytorch_fids_and_survives_scipy_1_18(monkeypatch):
    """Equal to pytorch-fid to the last bit today; and with scipy's ``sqrtm`` as SciPy 1.18 defines it (no ``disp``),
    ours still computes the same value where pytorch-fid's own call fails."""
    import scipy.linalg
    from pytorch_fid.fid_score import calculate_frechet_distance

    from bksdm.evaluate.metrics import frechet_distance

    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(300, 64)), rng.normal(0.3, 1.2, size=(200, 64))
    args = (f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    ours = frechet_distance(*args)
    assert ours == float(calculate_frechet_distance(*args))
    singular = (f1[:20].mean(0), np.cov(f1[:20], rowvar=False), f2[:30].mean(0), np.cov(f2[:30], rowvar=False))
    assert frechet_distance(*singular) == float(calculate_frechet_distance(*singular))
    original = scipy.linalg.sqrtm

    def sqrtm_1_18(A):  # SciPy 1.18's signature: disp and blocksize removed, the matrix alone returned
        with np.errstate(all="ignore"):
            return original(A)

    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm_1_18)
    with pytest.raises(TypeError):
        calculate_frechet_distance(*args)
    assert frechet_distance(*args) == ours


def test_metric_folders_skip_hidden_and_broken_files_and_mixed_sizes(tmp_path, capsys, metric_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(metric_home))
    real, _ = _gen_folder(tmp_path, 4, "real")
    (real / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS copies these beside every file
    (real / "broken.png").write_bytes(b"\x89PNG cut short")
    assert main(["fid-stats", "--images", str(real), "--out", str(tmp_path / "s.npz"), "--size", "64"]) == 0
    err = capsys.readouterr().err
    assert "4 of 5 images used; 1 skipped: 1 not an image (first: " in err and "broken.png" in err
    # --size 0 with pictures of two sizes: measured, not a crash in np.stack
    mixed, prompts = _gen_folder(tmp_path, 2, "mixed")
    ShapesWorld(seed=2).sample(5)[0].resize((48, 48)).save(mixed / "00001.png")
    assert main(["evaluate", "--images", str(mixed), "--prompts", str(prompts), "--metrics", "fid", "--fid-ref",
                 str(tmp_path / "s.npz"), "--size", "0"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out.splitlines()[0])["fid"])
    # a generated image that cannot be read: one line naming it (leaving it out would change the sample)
    (mixed / "00001.png").write_bytes(b"\x89PNG cut short")
    assert main(["evaluate", "--images", str(mixed), "--prompts", str(prompts), "--metrics", "fid", "--fid-ref",
                 str(tmp_path / "s.npz")]) == 2
    assert "00001.png cannot be used (not an image)" in one_line_error(capsys)


# ------------------------------------------------------------------ messages and options


def test_messages_and_options_where_users_type_them(tiny_teacher_dir, tmp_path, capsys):
    # --threads after the command name, as users type it; a value before the name still counts
    parser = build_parser()
    assert parser.parse_args(["profile", "--arch", "sd-v1", "--threads", "2"]).threads == "2"
    assert parser.parse_args(["--threads", "3", "profile", "--arch", "sd-v1"]).threads == "3"
    assert parser.parse_args(["profile", "--arch", "sd-v1"]).threads is None
    # distill --help prints the gradient-checkpointing line as written (a % sign, not argparse's dictionary)
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    out = capsys.readouterr().out
    assert "option_strings" not in out and "~30% step time" in " ".join(out.split())
    # DreamBooth's advice names a flag the parser accepts
    subject = tmp_path / "subject"
    subject.mkdir()
    _scene().save(subject / "a.png")
    argv = ["dreambooth", "--model", str(tiny_teacher_dir), "--instance-dir", str(subject), "--instance-prompt",
            "a sks thing", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "--no-with-prior" in err
    assert build_parser().parse_args(argv + ["--no-with-prior"]).with_prior is False


def test_dreambooth_refuses_a_subject_photo_by_name_and_reason(tiny_teacher_dir, tmp_path, capsys):
    from bksdm.dreambooth.dataset import load_subject_images

    subject = tmp_path / "subject"
    subject.mkdir()
    _exif_rotated(subject / "a.png")
    (subject / "._a.png").write_bytes(b"\x00\x05\x16\x07")  # ignored: not an image file of the folder
    assert [im.size for im in load_subject_images(subject, 32)] == [(48, 64)]
    Image.new("RGB", (4000, 2)).save(subject / "strip.png")
    assert main(["dreambooth", "--model", str(tiny_teacher_dir), "--instance-dir", str(subject), "--instance-prompt",
                 "a sks thing", "--no-with-prior", "--out", str(tmp_path / "o"), "--resolution", "32",
                 "--mixed-precision", "no"]) == 2
    assert "strip.png cannot be used: too thin (4000x2 px" in one_line_error(capsys)


def test_dreambooth_uses_the_users_class_pictures_and_draws_only_the_shortfall(tiny_teacher_dir, tmp_path):
    from bksdm.dreambooth.config import DreamBoothConfig
    from bksdm.recipes.dreambooth import class_images

    classes = tmp_path / "classes"
    classes.mkdir()
    for i in range(2):
        _scene(i, (40, 40)).save(classes / f"dog_{i}.jpg")  # the user's own, any image file
    (classes / "broken.jpg").write_bytes(b"nope")  # unusable: skipped and counted, never deleted
    (classes / "00000.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")  # even named as ours: the user's file stays
    (classes / "00009.png").mkdir()  # a folder with an image's name is not a picture
    cfg = DreamBoothConfig(model=str(tiny_teacher_dir), class_dir=str(classes), class_prompt="a shape",
                           num_class_images=4, class_steps=2, resolution=32, out=str(tmp_path / "o"))
    images, skips = class_images(cfg, "cpu")
    assert len(images) == 4 and skips.total == 2
    names = sorted(p.name for p in classes.iterdir())
    assert names == ["00000.png", "00001.png", "00002.png", "00009.png", "broken.jpg", "dog_0.jpg", "dog_1.jpg"]
    assert (classes / "00000.png").read_bytes().endswith(b" cut") and (classes / "broken.jpg").read_bytes() == b"nope"
    assert np.array_equal(np.asarray(images[0]), np.asarray(open_image(classes / "00001.png")))  # in name order
    again, _ = class_images(cfg, "cpu")  # nothing more to draw: the same pictures in the same order
    assert sorted(p.name for p in classes.iterdir()) == names
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))


def test_tar_members_webdataset_conventions_are_kept(tmp_path, capsys):
    """macOS tar adds ``._NAME`` AppleDouble members; multi-part extensions (``000001.seg.png``) belong to their
    sample; dotted names with different extensions are split, never paired across samples."""
    from bksdm.distill.data import open_source

    members = []
    for i in range(2):
        members += [(f"._{i:06d}.png", b"\x00\x05\x16\x07"), (f"{i:06d}.png", _png(i)), (f"{i:06d}.seg.png", _png(5)),
                    (f"{i:06d}.txt", f"caption {i}".encode())]
    src = open_source(str(_tar(tmp_path / "mac.tar", members)))
    stream = src.samples()
    first = next(stream)
    assert set(first) == {"__key__", "png", "seg.png", "txt"}
    got = [src.decode(first), src.decode(next(stream))]
    assert [t for _, t in got] == ["caption 0", "caption 1"]
    assert np.array_equal(np.asarray(got[1][0]), np.asarray(ShapesWorld().sample(1)[0]))
    assert "dots" not in capsys.readouterr().err
    mixed = [("img.001.png", _png(0)), ("img.001.txt", b"one"), ("img.002.jpg", _png(1)), ("img.002.caption", b"two")]
    src = open_source(str(_tar(tmp_path / "mixed_ext.tar", mixed)))
    stream = src.samples()
    pairs = [src.decode(next(stream)) for _ in range(2)]
    assert [t for _, t in pairs] == ["one", "two"]
    assert np.array_equal(np.asarray(pairs[0][0]), np.asarray(ShapesWorld().sample(0)[0]))


def test_metadata_files_that_would_be_misread_are_refused_in_one_line(tiny_teacher_dir, tmp_path, capsys):
    data, rows = _folder(tmp_path, n=2)
    argv = ["distill", "--teacher", str(tiny_teacher_dir), "--data", str(data), "--out", str(tmp_path / "o"),
            "--max-steps", "1", *FAST]
    (data / "metadata.csv").write_text("file_name,caption,text,text\n" + "".join(f"{n},a,b,c\n" for n, _ in rows))
    assert main(argv) == 2
    assert "has the column 'text' more than once" in one_line_error(capsys)
    (data / "metadata.csv").write_text("file_name,text\n" + "".join(f"{n},{t}\n" for n, t in rows), encoding="utf-16")
    assert main(argv) == 2
    assert "is UTF-16 text; re-save it as UTF-8" in one_line_error(capsys)
    (data / "metadata.csv").write_text("file_name,desc\n" + "".join(f"{n},{t}\n" for n, t in rows))
    assert main(["cache", "--teacher", str(tiny_teacher_dir), "--data", str(data), "--out", str(tmp_path / "c"),
                 "--resolution", "32"]) == 2
    assert "pass --caption-column NAME" in one_line_error(capsys)  # the advice names a flag cache accepts
    assert main(["cache", "--teacher", str(tiny_teacher_dir), "--data", str(data), "--out", str(tmp_path / "c"),
                 "--resolution", "32", "--caption-column", "desc"]) == 0


def test_a_config_diffusers_cannot_build_is_one_line(tiny_teacher_dir, tmp_path, capsys):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    cfg = json.loads((teacher / "unet" / "config.json").read_text())
    cfg["addition_embed_type"] = "text_time"  # SDXL's conditioning without its projection sizes
    (teacher / "unet" / "config.json").write_text(json.dumps(cfg))
    assert main(["compress", "--teacher", str(teacher), "--student", "bk-small", "--out", str(tmp_path / "s")]) == 2
    assert "addition_embed_type 'text_time' but no addition_time_embed_dim" in one_line_error(capsys)


def test_skips_summary_counts_by_reason():
    s = Skips()
    for exc in (Unusable("too thin", "a.png", "4000x2 px"), Unusable("too thin", "b.png"), Unusable("no caption", "row 3")):
        s.add(exc)
    assert s.total == 3 and s.summary() == "3 skipped: 2 too thin (first: a.png (4000x2 px)), 1 no caption (first: row 3)"
    assert Skips().summary() == "none skipped"


# ------------------------------------------------------------------ LoRAs meet students through the key map


def _teacher_lora(teacher_dir, out, rank=4):
    from diffusers import UNet2DConditionModel

    from bksdm.dreambooth.config import lora_config
    from bksdm.lora import save_lora

    unet = UNet2DConditionModel.from_pretrained(teacher_dir / "unet")
    unet.add_adapter(lora_config("bk-sdm", "unet", rank))  # alpha != rank, as the BK-SDM preset
    torch.manual_seed(0)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    save_lora(out, "StableDiffusionPipeline", unet)
    return out / "pytorch_lora_weights.safetensors"


def test_a_teachers_lora_is_remapped_onto_its_student_and_changes_the_same_weights(tiny_teacher_dir, tmp_path, capsys):
    from bksdm.generate import fuse_lora
    from bksdm.models import generation_parts, load_components
    from bksdm.pipelines import load_record

    lora = _teacher_lora(tiny_teacher_dir, tmp_path / "lora")
    student = tmp_path / "small"
    assert main(["compress", "--teacher", str(tiny_teacher_dir), "--student", "bk-small", "--out", str(student)]) == 0
    capsys.readouterr()

    def delta(folder, record):
        parts = load_components(folder, (*generation_parts(folder), "scheduler"))
        before = {k: v.clone() for k, v in parts["unet"].state_dict().items()}
        done = fuse_lora(parts, parts["scheduler"], lora, record)
        after = parts["unet"].state_dict()
        return {k: after[k] - before[k] for k in before if not torch.equal(after[k], before[k])}, done

    teacher_delta, _ = delta(tiny_teacher_dir, None)
    record = load_record(student)
    student_delta, done = delta(student, record)
    assert "is for the teacher" in capsys.readouterr().err
    assert done["remapped"] > 0 and done["dropped"]  # removed blocks' modules dropped by name
    assert any(".attentions.1." in m for m in done["dropped"])
    key_map = record["key_map"]  # student tensor -> the teacher tensor it was copied from
    assert student_delta
    for k, d in student_delta.items():  # each change is the teacher's change of the same weights
        torch.testing.assert_close(d, teacher_delta[key_map[k]], rtol=0, atol=1e-6, msg=k)
    moved = {t for s, t in key_map.items() if t in teacher_delta}
    assert moved == {key_map[k] for k in student_delta}  # and every kept weight the teacher LoRA touches changes
    assert any(key_map[k] != k for k in student_delta)  # renumbered blocks were moved, not left on the wrong block
    # on the CLI: the counts travel in generate's result
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle at the top left\n")
    assert main(["generate", "--model", str(student), "--prompts", str(prompts), "--out", str(tmp_path / "g"),
                 "--lora", str(lora), "--steps", "2", "--save-size", "0", "--dtype", "fp32"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["lora"]["remapped"] == done["remapped"] and res["lora"]["dropped"] == len(done["dropped"])


def test_a_lora_that_does_not_fit_is_refused_with_counts(tiny_teacher_dir, tmp_path, capsys):
    import shutil

    lora = _teacher_lora(tiny_teacher_dir, tmp_path / "lora")
    student = tmp_path / "small"
    assert main(["compress", "--teacher", str(tiny_teacher_dir), "--student", "bk-small", "--out", str(student)]) == 0
    (student / "bksdm.json").unlink()  # a plain pipeline of another architecture: nothing says how to move it
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle at the top left\n")
    capsys.readouterr()
    assert main(["generate", "--model", str(student), "--prompts", str(prompts), "--out", str(tmp_path / "g"),
                 "--lora", str(lora), "--steps", "2", "--save-size", "0"]) == 2
    err = one_line_error(capsys)
    assert "does not fit this U-Net: 36 of its 64 U-Net modules fit" in err  # 28 of removed blocks
    shutil.rmtree(tmp_path / "g", ignore_errors=True)


def test_a_python_source_of_any_mode_is_read_under_the_same_policy():
    """A PairSource handing RGBA or grayscale pictures: composited on white / expanded to RGB like files are."""
    from bksdm.distill.loader import micro_batches

    rgba = _transparent()

    class Source:
        def __len__(self):
            return 2

        def get(self, i):
            return (rgba, "a cut-out") if i == 0 else (rgba.convert("L"), "a gray one")

    batch = next(micro_batches(Source(), 0, False, 32, 2, 0, 1, 0))
    assert batch["skipped"] == 0 and batch["pixels"].shape == (2, 3, 32, 32)
    corner = batch["pixels"][:, :, 0, -1]  # a transparent pixel of the cut-out reads as the white background
    assert torch.allclose(corner[[i for i, t in enumerate(batch["text"]) if t == "a cut-out"][0]], torch.ones(3))


def test_kohya_export_is_read_by_a_kohya_loader_at_the_trained_strength(tiny_teacher_dir, tmp_path, capsys):
    """`bksdm export LORA --format kohya`: kohya's names and .alpha tensors, read by diffusers' kohya converter (the
    path ComfyUI-style files take into diffusers), give the trained update W + (alpha / r) B A."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    lora = _teacher_lora(tiny_teacher_dir, tmp_path / "lora")  # the BK-SDM preset: alpha 27 != rank 4
    assert main(["export", str(lora), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 0
    kohya = load_file(tmp_path / "k.safetensors")
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert any(k.endswith(".alpha") for k in kohya) and any(k.endswith(".lora_down.weight") for k in kohya)
    fused = {}
    for name, file in (("ours", lora), ("kohya", tmp_path / "k.safetensors")):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher_dir, safety_checker=None)
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        pipe.fuse_lora()
        fused[name] = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora" not in k}
    changed = [k for k in fused["ours"] if not torch.equal(fused["ours"][k], fused["kohya"][k])]
    assert not [k for k in changed if (fused["ours"][k] - fused["kohya"][k]).abs().max() > 1e-6]
    capsys.readouterr()
    assert main(["export", str(tmp_path / "k.safetensors"), "--format", "kohya", "--out", str(tmp_path / "k2.safetensors")]) == 2
    assert "is not a diffusers SD-v1/v2 LoRA tensor" in one_line_error(capsys)


def test_a_kohya_teacher_lora_with_its_own_alphas_moves_onto_the_student(tiny_teacher_dir, tmp_path, capsys):
    """The common case: an SD-1.5 LoRA in kohya's names with .alpha != rank, made for the teacher, on a bk-small:
    every student weight changes exactly as the teacher weight it came from (attention modules included)."""
    from safetensors.torch import load_file, save_file

    from bksdm.generate import fuse_lora
    from bksdm.models import generation_parts, load_components
    from bksdm.pipelines import load_record

    lora = _teacher_lora(tiny_teacher_dir, tmp_path / "lora")
    assert main(["export", str(lora), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 0
    kohya = load_file(tmp_path / "k.safetensors")
    for k in [k for k in kohya if k.endswith(".alpha")]:  # the same update written with alpha = 2 rank, up halved
        kohya[k] = kohya[k] * 2
        up = k.replace(".alpha", ".lora_up.weight")
        kohya[up] = kohya[up] / 2
    save_file(kohya, str(tmp_path / "k2.safetensors"))
    student = tmp_path / "small"
    assert main(["compress", "--teacher", str(tiny_teacher_dir), "--student", "bk-small", "--out", str(student)]) == 0

    def delta(folder, record):
        parts = load_components(folder, (*generation_parts(folder), "scheduler"))
        before = {k: v.clone() for k, v in parts["unet"].state_dict().items()}
        done = fuse_lora(parts, parts["scheduler"], tmp_path / "k2.safetensors", record)
        after = parts["unet"].state_dict()
        return {k: after[k] - before[k] for k in before if not torch.equal(after[k], before[k])}, done

    teacher_delta, _ = delta(tiny_teacher_dir, None)
    record = load_record(student)
    student_delta, done = delta(student, record)
    assert done["modules"] == 64 and done["remapped"] + len(done["dropped"]) == 64
    key_map = record["key_map"]
    assert any(".attn1.to_q" in k for k in student_delta)  # the attention modules kohya names are moved too
    for k, d in student_delta.items():
        torch.testing.assert_close(d, teacher_delta[key_map[k]], rtol=0, atol=1e-6, msg=k)
    assert {t for t in key_map.values() if t in teacher_delta} == {key_map[k] for k in student_delta}


def test_kohya_export_faults_are_one_line_and_write_nothing(tiny_teacher_dir, tmp_path, capsys):
    lora = _teacher_lora(tiny_teacher_dir, tmp_path / "lora")
    capsys.readouterr()
    # a pipeline folder holds no LoRA file
    assert main(["export", str(tiny_teacher_dir), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 2
    assert "pytorch_lora_weights.safetensors does not exist" in one_line_error(capsys)
    assert not (tmp_path / "k.safetensors").exists()
    # a file that is not a LoRA
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    assert main(["export", str(tmp_path / "junk.safetensors"), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 2
    assert "LoRA file" in one_line_error(capsys) and not (tmp_path / "k.safetensors").exists()
    # an existing output is kept unless --overwrite
    (tmp_path / "k.safetensors").write_bytes(b"mine")
    assert main(["export", str(lora), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 2
    assert "--overwrite" in one_line_error(capsys) and (tmp_path / "k.safetensors").read_bytes() == b"mine"
