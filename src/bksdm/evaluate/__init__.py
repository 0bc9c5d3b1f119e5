"""Evaluation: FID (pytorch-fid), IS (torch-fidelity), CLIP score (open_clip), and the mini-world metrics."""
