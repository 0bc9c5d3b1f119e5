"""CMMD, clean-FID/KID and the human-preference scores (issue #27): each equals its reference on the same files with
random weights of the real architecture, does not depend on the batch size, and fails in one line.

Default tier: the real network classes at reduced width/depth (the full-size configs cost minutes on a CPU);
``RUN_SLOW=1``: the full-size ViT-L/14-336, ViT-H/14 and BLIP configs. Equality with the ``hpsv2`` and
``image-reward`` packages and with the CMMD reference code, which cannot be installed next to bksdm, is in
tests/test_metrics_reference_env.py (``RUN_REFERENCE_ENV=1``) and recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import csv
import gzip
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from bksdm.cli import main
from bksdm.mini.world import ShapesWorld
from tests.conftest import one_line_error, write_prompt_csv

SIZES = [(64, 48), (40, 64), (56, 56)]  # landscape, portrait, square: centre crop and padding both exercised


def make_folder(root, name, n, seed, offset=0):
    world = ShapesWorld(seed=seed)
    folder = root / name
    folder.mkdir()
    rows = []
    for i in range(n):
        image, caption = world.sample(i + offset)[:2]
        file = f"COCO_val2014_{i:012d}.png"
        image.resize(SIZES[i % len(SIZES)]).save(folder / file)
        rows.append((file, caption))
    return folder, rows




@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 generated images with their prompt csv, and 7 reference images."""
    root = tmp_path_factory.mktemp("modern")
    gen, rows = make_folder(root, "gen", 6, seed=11)
    ref, _ = make_folder(root, "ref", 7, seed=12, offset=50)
    return {"root": root, "gen": gen, "ref": ref, "rows": rows, "prompts": write_prompt_csv(root / "prompts.csv", rows)}


def _evaluate(data, metrics, **kw):
    from bksdm.recipes.evaluate import evaluate

    return evaluate(data["gen"], data["prompts"], metrics, device="cpu", **kw)


# ---------------------------------------------------------------- CMMD
def clip336(folder, full: bool = False):
    """A random-weight transformers CLIPVisionModelWithProjection at 336 px, patch 14, with its image processor:
    full = ViT-L/14-336 (openai/clip-vit-large-patch14-336's config), else 2 layers of width 64."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    width = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 projection_dim=768) if full else \
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=336, patch_size=14, hidden_act="quick_gelu", **width)) \
        .save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip336(tmp_path_factory):
    return clip336(tmp_path_factory.mktemp("clip336"))


def reference_embeddings(folder, clip_dir) -> np.ndarray:
    """CLIP embeddings the way the CMMD reference computes them, with the reference's own library calls: each image
    centre-cropped and PIL-bicubic-resized to 336, /255, ``CLIPImageProcessor`` with only normalisation on, one image
    at a time, ``image_embeds`` L2-normalised."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    proc = CLIPImageProcessor.from_pretrained(clip_dir)
    out = []
    for p in sorted(folder.iterdir()):
        im = Image.open(p).convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((336, 336), Image.BICUBIC)
        x = np.asarray(im).astype(np.float32)[None] / 255.0
        inputs = proc(images=x, do_normalize=True, do_center_crop=False, do_resize=False, do_rescale=False,
                      return_tensors="pt")
        with torch.no_grad():
            e = model(**inputs).image_embeds
        out.append((e / torch.linalg.norm(e, dim=-1, keepdim=True)).numpy())
    return np.concatenate(out)


def reference_mmd(x: np.ndarray, y: np.ndarray, dtype=torch.float32) -> float:
    """CMMD's definition: 1000 x (mean K_xx + mean K_yy - 2 mean K_xy), K = exp(-||a - b||^2 / (2 * 10^2)), all pairs
    (diagonal included). In float32 through ``||a||^2 + ||b||^2 - 2 a.b``, as the reference evaluates it, or
    through ``torch.cdist`` in float64 (an independent evaluation, which differs by the float32 rounding)."""
    a, b = torch.from_numpy(x).to(dtype), torch.from_numpy(y).to(dtype)
    if dtype == torch.float64:
        k = lambda u, v: torch.exp(-torch.cdist(u, v) ** 2 / 200.0).mean()  # noqa: E731
    else:
        k = lambda u, v: torch.exp(-(-2 * u @ v.T + (u * u).sum(1)[:, None] + (v * v).sum(1)[None]) / 200.0).mean()  # noqa: E731
    return float(1000 * (k(a, a) + k(b, b) - 2 * k(a, b)))


def test_cmmd_equals_the_reference_definition_and_its_saved_embeddings(data, tiny_clip336, tmp_path):
    from bksdm.evaluate.cmmd import folder_embeddings
    from bksdm.evaluate.registry import EvalInputs

    ours = _evaluate(data, ["cmmd"], cmmd_ref=str(data["ref"]), cmmd_clip=str(tiny_clip336))["cmmd"]
    x, y = reference_embeddings(data["ref"], tiny_clip336), reference_embeddings(data["gen"], tiny_clip336)
    inputs = EvalInputs([], [], cmmd_clip=str(tiny_clip336), batch=4)
    assert np.allclose(folder_embeddings(data["ref"], inputs), x, rtol=1e-5, atol=1e-6)
    assert np.allclose(folder_embeddings(data["gen"], inputs), y, rtol=1e-5, atol=1e-6)
    ref = reference_mmd(x, y)
    assert ref > 1e-3  # the random network separates the two sets: the check is not 0 == 0
    assert ours == pytest.approx(ref, rel=1e-5)
    assert ours == pytest.approx(reference_mmd(x, y, torch.float64), abs=2e-4)  # float32 rounding of the reference
    # the saved-embeddings route (cmmd-stats) gives the folder route's value
    assert main(["cmmd-stats", "--images", str(data["ref"]), "--out", str(tmp_path / "ref.npy"),
                 "--cmmd-clip", str(tiny_clip336), "--device", "cpu"]) == 0
    emb = np.load(tmp_path / "ref.npy")
    assert emb.shape == (7, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-6)
    assert _evaluate(data, ["cmmd"], cmmd_ref=str(tmp_path / "ref.npy"), cmmd_clip=str(tiny_clip336))["cmmd"] == ours


def test_cmmd_does_not_depend_on_batch_size(data, tiny_clip336):
    runs = [_evaluate(data, ["cmmd"], cmmd_ref=str(data["ref"]), cmmd_clip=str(tiny_clip336), batch=b)["cmmd"]
            for b in (1, 4)]
    assert runs[0] == pytest.approx(runs[1], rel=1e-6)


def test_mmd_is_zero_on_itself_and_symmetric():
    from bksdm.evaluate.cmmd import mmd

    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 16)).astype(np.float32)
    y = rng.normal(size=(5, 16)).astype(np.float32) + 0.5
    assert abs(mmd(x, x)) < 1e-3 and mmd(x, y) > 1
    assert mmd(x, y) == pytest.approx(mmd(y, x), rel=1e-5)


@pytest.mark.slow
def test_cmmd_full_size_vit_l14_336_equals_the_reference_definition(data, tmp_path):
    folder = clip336(tmp_path / "clip", full=True)
    ours = _evaluate(data, ["cmmd"], cmmd_ref=str(data["ref"]), cmmd_clip=str(folder), batch=3)["cmmd"]
    x, y = reference_embeddings(data["ref"], folder), reference_embeddings(data["gen"], folder)
    assert ours == pytest.approx(reference_mmd(x, y), rel=1e-5)


# ---------------------------------------------------------------- clean-FID and KID
@pytest.fixture(scope="module")
def clean_weights(tmp_path_factory):
    return clean_inception_file(tmp_path_factory.mktemp("clean"))


def clean_inception_file(folder):
    """A TorchScript Inception as clean-fid loads it (``base.layers`` -> (B, 2048, 1, 1) of inputs in [-1, 1]):
    the FID Inception architecture (the TF 2015-12-05 graph, as pytorch-fid ports it) with random weights."""
    from bksdm.evaluate.clean import CLEAN_INCEPTION
    from bksdm.evaluate.weights import random_inception

    m = random_inception(3)
    layers = torch.nn.Sequential(m.Conv2d_1a_3x3, m.Conv2d_2a_3x3, m.Conv2d_2b_3x3, torch.nn.MaxPool2d(3, 2),
                                 m.Conv2d_3b_1x1, m.Conv2d_4a_3x3, torch.nn.MaxPool2d(3, 2), m.Mixed_5b, m.Mixed_5c,
                                 m.Mixed_5d, m.Mixed_6a, m.Mixed_6b, m.Mixed_6c, m.Mixed_6d, m.Mixed_6e, m.Mixed_7a,
                                 m.Mixed_7b, m.Mixed_7c, torch.nn.AdaptiveAvgPool2d(1)).eval()

    class Base(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            return self.layers(x)

    path = folder / CLEAN_INCEPTION
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(Base().eval(), torch.rand(1, 3, 299, 299)), str(path))
    return path


def cleanfid_features(weights):
    from cleanfid.inception_torchscript import InceptionV3W

    model = InceptionV3W(str(weights.parent), download=False).eval()
    return lambda x: model(x)


def test_clean_fid_and_kid_equal_cleanfid_on_the_same_folders(data, clean_weights, monkeypatch):
    import cleanfid.fid as cf
    import scipy.linalg

    res = _evaluate(data, ["clean_fid", "kid"], clean_ref=str(data["ref"]), clean_weights=str(clean_weights), batch=4)
    fn = cleanfid_features(clean_weights)

    def sqrtm(a, disp=True):  # clean-fid passes disp=False, which SciPy 1.18 removes; the same matrix either way
        out = scipy.linalg.sqrtm(a)
        out = out[0] if isinstance(out, tuple) else out
        return out if disp else (out, 0.0)

    monkeypatch.setattr(cf, "linalg", type("linalg", (), {"sqrtm": staticmethod(sqrtm)}))
    fid = cf.compute_fid(str(data["gen"]), str(data["ref"]), mode="clean", custom_feat_extractor=fn, num_workers=0,
                         batch_size=4, device=torch.device("cpu"), verbose=False)
    monkeypatch.setattr(cf, "build_feature_extractor", lambda mode, device, use_dataparallel=True: fn)
    np.random.seed(0)
    kid = cf.compute_kid(str(data["gen"]), str(data["ref"]), mode="clean", num_workers=0, batch_size=4,
                         device=torch.device("cpu"), verbose=False)
    assert fid > 1e-3 and abs(kid) > 1e-9  # features differ between the folders
    assert res["clean_fid"] == pytest.approx(fid, rel=1e-9)
    assert res["kid"] == pytest.approx(kid, rel=1e-9)
    # batch size 1 gives the same features, hence the same numbers
    from bksdm.evaluate.clean import feature_extractor, files_features

    files = sorted(data["gen"].iterdir())
    ours = feature_extractor(str(clean_weights))
    assert np.allclose(files_features(files, ours, batch=1), files_features(files, ours, batch=4), rtol=1e-5, atol=1e-6)


def test_kid_leaves_numpys_generator_alone(clean_weights):
    from bksdm.evaluate.clean import kid

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 2048)), rng.normal(size=(5, 2048)) + 0.1
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    first = kid(a, b)
    assert np.random.rand() == expected and kid(a, b) == first


# ---------------------------------------------------------------- PickScore
def clip_tokenizer_files(folder):
    """CLIP's real BPE vocabulary (open_clip ships it) as the vocab.json + merges.txt a transformers CLIPTokenizer
    reads (the files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K hold the same tokens)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in lines]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


def pickscore_dirs(root, full: bool = False):
    """(model folder, processor folder): a random-weight transformers CLIPModel (full = ViT-H/14 as PickScore_v1's
    config: vision 32 x 1280, text 24 x 1024, projection 1024) and a CLIP processor (224 px, CLIP's vocabulary)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    if full:
        vision = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16)
        text = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
        proj = 1024
    else:
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        proj = 32
    cfg = CLIPConfig(text_config=dict(hidden_act="gelu", **text),
                     vision_config=dict(image_size=224, patch_size=14, hidden_act="gelu", **vision), projection_dim=proj)
    CLIPModel(cfg).save_pretrained(root / "model")
    tok = clip_tokenizer_files(root / "tok")
    CLIPProcessor(image_processor=CLIPImageProcessor(),
                  tokenizer=CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"))).save_pretrained(root / "proc")
    return root / "model", root / "proc"


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory):
    return pickscore_dirs(tmp_path_factory.mktemp("pickscore"))


def readme_pickscore(model_dir, proc_dir, images, prompts) -> list[float]:
    """The PickScore README's procedure, one prompt with its image at a time."""
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(proc_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    out = []
    for image, prompt in zip(images, prompts):
        image_inputs = processor(images=[image], padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            ie = model.get_image_features(**image_inputs)
            te = model.get_text_features(**text_inputs)
            ie = ie if isinstance(ie, torch.Tensor) else ie.pooler_output
            te = te if isinstance(te, torch.Tensor) else te.pooler_output
            ie = ie / torch.norm(ie, dim=-1, keepdim=True)
            te = te / torch.norm(te, dim=-1, keepdim=True)
            out.append(float(model.logit_scale.exp() * (te @ ie.T)[0][0]))
    return out


def _images_and_prompts(data):
    return [Image.open(data["gen"] / f).convert("RGB") for f, _ in data["rows"]], [c for _, c in data["rows"]]


def test_pickscore_equals_the_readme_procedure_per_image(data, tiny_pickscore, tmp_path):
    model_dir, proc_dir = tiny_pickscore
    kw = dict(pickscore_model=str(model_dir), pickscore_processor=str(proc_dir))
    res = _evaluate(data, ["pickscore"], per_image=tmp_path / "scores.csv", batch=4, **kw)
    ref = readme_pickscore(model_dir, proc_dir, *_images_and_prompts(data))
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert [r["file_name"] for r in rows] == [f for f, _ in data["rows"]]
    assert np.allclose([float(r["pickscore"]) for r in rows], ref, rtol=1e-5, atol=0)
    assert np.ptp(ref) > 1e-4  # images score differently: the pairing of image and prompt is checked
    assert res["pickscore"] == pytest.approx(float(np.mean(ref)), rel=1e-5)
    assert _evaluate(data, ["pickscore"], batch=1, **kw)["pickscore"] == pytest.approx(res["pickscore"], rel=1e-6)


@pytest.mark.slow
def test_pickscore_full_size_vit_h14_equals_the_readme_procedure(data, tmp_path):
    model_dir, proc_dir = pickscore_dirs(tmp_path, full=True)
    res = _evaluate(data, ["pickscore"], pickscore_model=str(model_dir), pickscore_processor=str(proc_dir), batch=3)
    ref = readme_pickscore(model_dir, proc_dir, *_images_and_prompts(data))
    assert res["pickscore"] == pytest.approx(float(np.mean(ref)), rel=1e-5)


# ---------------------------------------------------------------- HPSv2
@pytest.fixture(scope="module")
def tiny_hpsv2(tmp_path_factory):
    """A random-weight open_clip model (ViT-H-14's layout at width 64) saved as an HPSv2 checkpoint
    ({"state_dict": ...}), registered under a test name."""
    import open_clip

    home = tmp_path_factory.mktemp("hps")
    (home / "bksdm-tiny-hps.json").write_text(json.dumps({
        "embed_dim": 32, "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 16, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}))
    open_clip.add_model_config(home / "bksdm-tiny-hps.json")
    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.create_model("bksdm-tiny-hps").state_dict()}, home / "hps.pt")
    return home / "hps.pt"


def test_hpsv2_transform_pads_the_short_side_after_resizing_the_long_one():
    from bksdm.evaluate.preference import CLIP_MEAN, CLIP_STD, hpsv2_transform

    x = hpsv2_transform(Image.new("RGB", (100, 50), (255, 255, 255)))
    assert x.shape == (3, 224, 224)
    black = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    white = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    assert torch.allclose(x[:, 0, 100], black, atol=1e-5) and torch.allclose(x[:, 223, 100], black, atol=1e-5)
    assert torch.allclose(x[:, 112, 100], white, atol=1e-3)  # 224 x 112 of picture, 56 rows of 0 above and below
    assert torch.allclose(x[:, 56, 0], white, atol=2e-2) and torch.allclose(x[:, 55, 0], black, atol=1e-5)
    assert hpsv2_transform(Image.new("RGB", (224, 100))).shape == (3, 224, 224)  # long side already 224: padded too


def test_hpsv2_is_the_cosine_of_the_open_clip_forward_and_batch_invariant(data, tiny_hpsv2):
    import open_clip

    from bksdm.evaluate.preference import hpsv2_model, hpsv2_scores, hpsv2_transform

    model, tok = hpsv2_model(str(tiny_hpsv2), arch="bksdm-tiny-hps")
    images, prompts = _images_and_prompts(data)
    ours = hpsv2_scores(images, prompts, model, tok, batch=4)
    ref = []
    with torch.no_grad():  # hpsv2.score: model(image, text) with output_dict, diagonal of image @ text.T
        model.output_dict = True
        for im, p in zip(images, prompts):
            out = model(hpsv2_transform(im)[None], open_clip.get_tokenizer("ViT-H-14")([p]))
            ref.append(float((out["image_features"] @ out["text_features"].T)[0, 0]))
    assert np.ptp(ref) > 1e-4 and np.allclose(ours, ref, rtol=1e-5, atol=1e-7)
    assert np.allclose(hpsv2_scores(images, prompts, model, tok, batch=1), ours, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_hpsv2_full_size_vit_h14_checkpoint_loads_and_scores(data, tmp_path):
    import open_clip

    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.create_model("ViT-H-14").state_dict()}, tmp_path / "HPS_v2_compressed.pt")
    res = _evaluate(data, ["hpsv2"], hpsv2_weights=str(tmp_path / "HPS_v2_compressed.pt"), batch=3)
    assert -1 <= res["hpsv2"] <= 1 and res["hpsv2"] != 0


# ---------------------------------------------------------------- ImageReward
TINY_IR = dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu"),
               text=dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         encoder_hidden_size=64, max_position_embeddings=64, layer_norm_eps=1e-12, hidden_act="gelu",
                         bos_token_id=None, sep_token_id=None))


def bert_vocab(folder):
    """A BERT WordPiece vocabulary with bert-base-uncased's special-token ids ([PAD] 0, [UNK] 100, [CLS] 101,
    [SEP] 102, [MASK] 103) and the mini world's words."""
    from transformers import BertTokenizer

    from tests.conftest import WORDS

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", *[f"[unused{i}]" for i in range(99)], "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(words)) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def package_state(net) -> dict:
    """``net``'s weights under the image-reward package's key names (the inverse of ``checkpoint_map``)."""
    from bksdm.evaluate.imagereward import checkpoint_map

    own = net.state_dict()
    return {theirs: own[ours].clone() for theirs, ours in checkpoint_map(net, net.vision.config.num_hidden_layers).items()}


def test_imagereward_checkpoint_round_trip_and_batch_invariance(data, tmp_path):
    from bksdm.evaluate.imagereward import ImageRewardNet, load_checkpoint, scores, tokenizer

    torch.manual_seed(0)
    net = ImageRewardNet(**TINY_IR).eval()
    state = package_state(net)
    assert sum(k.startswith("blip.visual_encoder.blocks.1.") for k in state) == 12  # 6 layers x weight, bias
    torch.manual_seed(1)
    fresh = load_checkpoint(ImageRewardNet(**TINY_IR), state).eval()
    tok = tokenizer(str(bert_vocab(tmp_path / "bert")))
    images, prompts = _images_and_prompts(data)
    a = scores(images, prompts, net, tok, batch=4)
    assert np.ptp(a) > 1e-4
    assert np.allclose(scores(images, prompts, fresh, tok, batch=1), a, rtol=1e-5, atol=1e-6)
    bad = dict(state)
    bad.pop("mlp.layers.7.bias")
    with pytest.raises(Exception, match="1 tensors missing"):
        load_checkpoint(ImageRewardNet(**TINY_IR), bad)


@pytest.mark.slow
def test_imagereward_full_size_checkpoint_through_evaluate(data, tmp_path):
    from bksdm.evaluate.imagereward import ImageRewardNet

    torch.manual_seed(0)
    torch.save(package_state(ImageRewardNet()), tmp_path / "ImageReward.pt")
    res = _evaluate(data, ["imagereward"], imagereward_weights=str(tmp_path / "ImageReward.pt"),
                    imagereward_tokenizer=str(bert_vocab(tmp_path / "bert")), batch=3)
    assert np.isfinite(res["imagereward"])


# ---------------------------------------------------------------- registry, CLI and faults
def test_new_metrics_are_registered_with_columns_and_help():
    from bksdm.evaluate.registry import load_providers
    from bksdm.recipes.evaluate import markdown_row

    metrics = load_providers()
    for name in ("cmmd", "clean_fid", "kid", "pickscore", "hpsv2", "imagereward"):
        assert name in metrics and metrics[name].help
    row = markdown_row("m", {"fid": 1.0, "cmmd": 0.5, "kid": 0.01, "hpsv2": 0.27})
    assert "| fid | cmmd | kid | hpsv2 |" in row and "| m | 1.0000 | 0.5000 | 0.0100 | 0.2700 |" in row


def _cli(data, *args):
    return main(["evaluate", "--images", str(data["gen"]), "--prompts", str(data["prompts"]), "--device", "cpu", *args])


def test_missing_weights_fail_fast_naming_the_file_and_flag(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HPS_ROOT", str(tmp_path / "hps"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    import bksdm.evaluate.clean as C

    monkeypatch.setattr(C, "CLEANFID_DOWNLOAD_DIR", str(tmp_path / "none"))
    ref = ["--cmmd-ref", str(data["ref"]), "--clean-fid-ref", str(data["ref"])]
    for metric, needles in [("cmmd", ["openai/clip-vit-large-patch14-336", "--cmmd-clip"]),
                            ("clean_fid", ["inception-2015-12-05.pt", "--clean-fid-weights"]),
                            ("kid", ["inception-2015-12-05.pt", "--clean-fid-weights"]),
                            ("pickscore", ["yuvalkirstain/PickScore_v1", "--pickscore-model"]),
                            ("hpsv2", ["HPS_v2_compressed.pt", "--hpsv2-weights"]),
                            ("imagereward", ["--imagereward-tokenizer"])]:
        t0 = time.time()
        assert _cli(data, "--metrics", metric, *ref) == 2
        err = one_line_error(capsys)
        assert time.time() - t0 < 10 and all(n in err for n in needles), err
    tok = bert_vocab(tmp_path / "bert")
    assert _cli(data, "--metrics", "imagereward", "--imagereward-tokenizer", str(tok)) == 2
    err = one_line_error(capsys)
    assert "ImageReward.pt" in err and "--imagereward-weights" in err
    assert _cli(data, "--metrics", "hpsv2", "--hpsv2-weights", str(tmp_path / "nope.pt")) == 2
    assert "nope.pt do not exist" in one_line_error(capsys)


def test_references_and_counts_are_checked_before_networks_load(data, tmp_path, capsys, clean_weights):
    assert _cli(data, "--metrics", "cmmd") == 2
    assert "--cmmd-ref" in one_line_error(capsys)
    # cmmd-stats of a folder that is not there: one line, before CLIP loads, nothing written
    assert main(["cmmd-stats", "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "e.npy")]) == 2
    assert "does not exist" in one_line_error(capsys) and not (tmp_path / "e.npy").exists()
    assert _cli(data, "--metrics", "kid", "--clean-fid-weights", str(clean_weights)) == 2
    assert "--clean-fid-ref" in one_line_error(capsys)
    np.save(tmp_path / "bad.npy", np.zeros(5))
    assert _cli(data, "--metrics", "cmmd", "--cmmd-ref", str(tmp_path / "bad.npy")) == 2
    assert "expected finite (N, D)" in one_line_error(capsys)
    # KID's subsets need 2 images a side: one generated image, or a one-image reference
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (32, 32)).save(one / "COCO_val2014_000000000000.png")
    prompts = write_prompt_csv(tmp_path / "one.csv", data["rows"][:1])
    assert main(["evaluate", "--images", str(one), "--prompts", str(prompts), "--metrics", "kid", "--clean-fid-ref",
                 str(data["ref"]), "--clean-fid-weights", str(clean_weights), "--device", "cpu"]) == 2
    assert "KID needs at least 2 generated images for its subsets (got 1)" in one_line_error(capsys)
    # a reference that does not exist, before any network loads
    assert _cli(data, "--metrics", "kid", "--clean-fid-ref", str(tmp_path / "nowhere")) == 2
    assert "kid: --clean-fid-ref" in one_line_error(capsys)
    np.savez(tmp_path / "one_ref.npz", feats=np.zeros((1, 2048), np.float32))
    assert _cli(data, "--metrics", "kid", "--clean-fid-ref", str(tmp_path / "one_ref.npz"),
                "--clean-fid-weights", str(clean_weights)) == 2
    assert "(got 6 generated, 1 reference)" in one_line_error(capsys)


def test_a_missing_prompt_is_one_line(data, tmp_path, capsys, tiny_pickscore):
    rows = [(f, "" if i == 2 else c) for i, (f, c) in enumerate(data["rows"])]
    prompts = write_prompt_csv(tmp_path / "p.csv", rows)
    model_dir, proc_dir = tiny_pickscore
    code = main(["evaluate", "--images", str(data["gen"]), "--prompts", str(prompts), "--metrics", "pickscore",
                 "--pickscore-model", str(model_dir), "--pickscore-processor", str(proc_dir), "--device", "cpu"])
    assert code == 2
    err = one_line_error(capsys)
    assert "the prompt of COCO_val2014_000000000002.png is empty" in err, err
    # a row without its caption field at all is refused by the prompt reader
    (tmp_path / "short.csv").write_text("file_name,caption\nCOCO_val2014_000000000000.png\n")
    assert main(["evaluate", "--images", str(data["gen"]), "--prompts", str(tmp_path / "short.csv"), "--metrics",
                 "hpsv2", "--device", "cpu"]) == 2
    assert "line 2 is malformed" in one_line_error(capsys)


def test_unknown_evaluation_option_and_per_image_without_scores(data, tmp_path):
    from bksdm.errors import UserError
    from bksdm.recipes.evaluate import evaluate

    with pytest.raises(UserError, match="unknown evaluation option 'cmmd_reff'"):
        evaluate(data["gen"], data["prompts"], ["cmmd"], cmmd_reff="x")
    with pytest.raises(UserError, match="--per-image needs a per-image metric"):
        evaluate(data["gen"], data["prompts"], ["fidelity"], per_image=tmp_path / "x.csv")


def test_scores_go_into_a_model_card_and_progress_takes_the_new_flags(data, tmp_path, capsys):
    from bksdm.cards import add_measured

    card = tmp_path / "student"
    card.mkdir()
    (card / "README.md").write_text("# student\n\n## Measured\n\n| metric | value |\n|---|---:|\n| final task loss | 0.1 |\n"
                                    "\n## Samples\n\n![samples](samples.png)\n")
    assert _cli(data, "--metrics", "fidelity", "--card", str(card)) == 0
    add_measured(card, {"cmmd": 0.5, "fidelity": 0.25}, "6 images of x.csv")
    text = (card / "README.md").read_text()
    assert "| final task loss | 0.1 |" in text and "| cmmd | 0.5 |" in text and "| fidelity | 0.25 |" in text
    assert text.count("| fidelity |") == 1 and text.index("## Measured") < text.index("## Samples")
    assert _cli(data, "--metrics", "fidelity", "--card", str(tmp_path / "nocard")) == 2
    assert "has no model card" in one_line_error(capsys)
    assert main(["evaluate-progress", "--run", str(tmp_path / "norun"), "--prompts", str(data["prompts"]), "--metrics",
                 "kid", "cmmd", "--clean-fid-ref", str(data["ref"]), "--cmmd-ref", str(data["ref"])]) == 2
    assert "not a distillation run folder" in one_line_error(capsys)


@pytest.mark.slow
def test_demo_report_takes_a_further_metric_by_name(tmp_path, clean_weights):
    """`bksdm demo --metrics kid ...`: the registry metric runs on teacher and student and becomes a report column."""
    from bksdm.recipes.mini_report import REPORT_COLUMNS

    ref, _ = make_folder(tmp_path, "real", 8, seed=21)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2", "--images", "8", "--gen-steps", "2", "--curve-images", "4",
                 "--metrics", "kid", "--clean-fid-ref", str(ref), "--clean-fid-weights", str(clean_weights)]) == 0
    report = (out / "report.md").read_text()
    first_table = next(line for line in report.splitlines() if line.startswith("| model"))
    assert [c.strip() for c in first_table.strip("|").split("|")] == REPORT_COLUMNS + ["kid"]
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert all(np.isfinite(r["kid"]) for r in rows if "fidelity" in r)
