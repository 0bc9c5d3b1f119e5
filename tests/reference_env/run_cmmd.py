"""CMMD by the reference code (sayakpaul/cmmd-pytorch ``main.compute_cmmd``) with a local CLIP folder.

Usage: python run_cmmd.py REPO CLIP_DIR REF_DIR EVAL_DIR BATCH  -> prints {"cmmd": value}
"""

import json
import sys

repo, clip_dir, ref_dir, eval_dir, batch = sys.argv[1:6]
sys.path.insert(0, repo)
sys.argv = sys.argv[:1]  # absl flags parse nothing of ours

import embedding  # noqa: E402  (the reference's modules)
import main  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
embedding._CLIP_MODEL_NAME = clip_dir  # the same random-weight CLIP bksdm reads (hub id -> local folder)
embedding._CUDA_AVAILABLE = False
print(json.dumps({"cmmd": float(main.compute_cmmd(ref_dir, eval_dir, batch_size=int(batch)))}))
