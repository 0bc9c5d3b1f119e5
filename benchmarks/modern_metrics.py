"""`bksdm evaluate` beside the reference tools for CMMD, clean-FID, KID, PickScore, HPSv2 and ImageReward (issue #27),
on the same folders with the same random weights of the real (full-size) architectures (no download).

    python benchmarks/modern_metrics.py [--images 12] [--reference-python /tmp/refenv/bin/python --cmmd-repo DIR]

clean-FID and KID: ``cleanfid.fid.compute_fid`` / ``compute_kid`` in this process; PickScore: the PickScore README's
procedure; CMMD, HPSv2 and ImageReward: the reference code run under ``--reference-python`` (built as
tests/reference_env/README.md says; rows are left out without it). Prints one Markdown row per metric.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bksdm.recipes.evaluate import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import test_metrics_modern as T  # noqa: E402  (the tests' random-weight builders)


def reference(python: str, script: str, *args) -> dict:
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([python, str(Path(T.__file__).parent / "reference_env" / script), *map(str, args)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--reference-python", help="python of the reference environment (hpsv2, image-reward)")
    ap.add_argument("--cmmd-repo", help="a checkout of sayakpaul/cmmd-pytorch")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        gen, items = T.make_folder(root, "gen", a.images, seed=11)
        ref, _ = T.make_folder(root, "ref", a.images + 1, seed=12, offset=50)
        prompts = T.write_csv(root / "p.csv", items)
        pairs = [[str(gen / f), c] for f, c in items]
        (root / "pairs.json").write_text(json.dumps(pairs))
        images, texts = [Image.open(p).convert("RGB") for p, _ in pairs], [c for _, c in pairs]

        def ours(metrics, **kw):
            return evaluate(gen, prompts, metrics, device="cpu", batch=4, **kw)

        # clean-FID and KID: a TorchScript file of the FID Inception architecture with random weights
        import cleanfid.fid as cf
        import scipy.linalg

        (root / "clean").mkdir()
        weights = T.clean_inception_file(root / "clean")
        fn = T.cleanfid_features(weights)
        res = ours(["clean_fid", "kid"], clean_ref=str(ref), clean_weights=str(weights))
        sq = scipy.linalg.sqrtm
        cf.linalg = type("linalg", (), {"sqrtm": staticmethod(lambda m, disp=True: (lambda o: o if disp else (o, 0.0))(
            (lambda r: r[0] if isinstance(r, tuple) else r)(sq(m))))})
        fid = cf.compute_fid(str(gen), str(ref), mode="clean", custom_feat_extractor=fn, num_workers=0, batch_size=4,
                             device=torch.device("cpu"), verbose=False)
        cf.build_feature_extractor = lambda mode, device, use_dataparallel=True: fn
        np.random.seed(0)
        kid = cf.compute_kid(str(gen), str(ref), mode="clean", num_workers=0, batch_size=4, device=torch.device("cpu"),
                             verbose=False)
        rows += [("clean_fid", "cleanfid.fid.compute_fid(gen, ref, mode='clean')", fid, res["clean_fid"]),
                 ("kid", "np.random.seed(0); cleanfid.fid.compute_kid(gen, ref)", kid, res["kid"])]

        # PickScore: full-size CLIP ViT-H/14 (PickScore_v1's config)
        model_dir, proc_dir = T.pickscore_dirs(root / "pick", full=True)
        res = ours(["pickscore"], pickscore_model=str(model_dir), pickscore_processor=str(proc_dir))
        rows.append(("pickscore", "PickScore README procedure, mean",
                     float(np.mean(T.readme_pickscore(model_dir, proc_dir, images, texts))), res["pickscore"]))

        if a.reference_python and a.cmmd_repo:
            clip = T.clip336(root / "clip", full=True)
            r = reference(a.reference_python, "run_cmmd.py", a.cmmd_repo, clip, ref, gen, 1)["cmmd"]
            rows.append(("cmmd", "cmmd-pytorch main.compute_cmmd(ref, gen)", r,
                         ours(["cmmd"], cmmd_ref=str(ref), cmmd_clip=str(clip))["cmmd"]))
        if a.reference_python:
            ckpt = root / "HPS_v2_compressed.pt"
            reference(a.reference_python, "run_hpsv2.py", "make", ckpt, 0)
            r = reference(a.reference_python, "run_hpsv2.py", "score", ckpt, root / "pairs.json")["hpsv2"]
            rows.append(("hpsv2", "hpsv2.score(image, prompt), mean", float(np.mean(r)),
                         ours(["hpsv2"], hpsv2_weights=str(ckpt))["hpsv2"]))
            tok = T.bert_vocab(root / "bert")
            r = reference(a.reference_python, "run_imagereward.py", root / "ir.pt", tok, root / "pairs.json", 0)["imagereward"]
            rows.append(("imagereward", "ImageReward.score(prompt, image), mean", float(np.mean(r)),
                         ours(["imagereward"], imagereward_weights=str(root / "ir.pt"), imagereward_tokenizer=str(tok))["imagereward"]))
    print(f"{a.images} generated + {a.images + 1} reference images (64x48, 40x64, 56x56 PNG), random weights of the "
          f"real architectures, CPU, torch {torch.__version__}")
    print("| metric | reference | value | bksdm evaluate | relative difference |\n|---|---|---:|---:|---:|")
    for name, how, r, b in rows:
        print(f"| {name} | {how} | {r:.10g} | {b:.10g} | {abs(b - r) / max(abs(r), 1e-30):.1e} |")


if __name__ == "__main__":
    main()
