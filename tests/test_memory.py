"""bksdm.memory against real CPU runs of a tiny Flux, the FLUX.1-dev -> Flux-Mini numbers on meta, and (slow) a
two-process FSDP2 distillation step on CPU with a frozen teacher, a trained student and feature hooks.

Run as a script (``python -m torch.distributed.run --nproc_per_node 2 tests/test_memory.py OUT.json``) this file is
the FSDP2 worker the slow test starts.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY_FLUX = dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=4, num_layers=3, num_single_layers=4,
                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                 axes_dims_rope=[4, 4, 8], guidance_embeds=True)
KEEP = {"transformer_blocks": [0, 2], "single_transformer_blocks": [0, 3]}
RES, TEXT, BATCH = 64, 6, 2  # 64 px -> 8x8 latents -> 16 packed image tokens


def _derivation():
    from bksdm.arch import dit

    return dit.derive(TINY_FLUX, dit.DiTSpec("tiny", KEEP))


def _real_models(der, dtype=torch.float32):
    import diffusers

    torch.manual_seed(0)
    cls = diffusers.FluxTransformer2DModel
    teacher = cls.from_config({k: v for k, v in TINY_FLUX.items() if k != "_class_name"}).to(dtype).eval().requires_grad_(False)
    torch.manual_seed(1)
    student = cls.from_config(der.student_config).to(dtype).train()
    return teacher, student


def _call(dtype=torch.float32, seed=0):
    from bksdm.arch import dit

    g = torch.Generator().manual_seed(seed)
    call = dit.dummy_inputs(TINY_FLUX, RES, TEXT, BATCH, device="cpu")
    return {k: (torch.randn(v.shape, generator=g).to(dtype) if k in ("hidden_states", "encoder_hidden_states",
                                                                  "pooled_projections") else v) for k, v in call.items()}


def test_weight_gradient_and_adamw_bytes_equal_a_real_step():
    from bksdm.memory import OPTIMIZER_STATES, STUDENT_GRADS, STUDENT_WEIGHTS, TEACHER_WEIGHTS, train_memory

    der = _derivation()
    teacher, student = _real_models(der)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student(**_call()).sample.square().mean().backward()
    opt.step()
    real = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    for shards in (1, 2):
        mem = train_memory(TINY_FLUX, der.student_config, RES, TEXT, BATCH, shards=shards, mixed_precision="no")
        ceil = lambda n: -(-n // shards)
        assert mem[STUDENT_WEIGHTS] == ceil(real([*student.parameters(), *student.buffers()]))
        assert mem[STUDENT_GRADS] == ceil(real(p.grad for p in student.parameters()))
        assert mem[OPTIMIZER_STATES] == ceil(real(states))  # exp_avg, exp_avg_sq, 0-d step per tensor
        assert mem[TEACHER_WEIGHTS] == ceil(real([*teacher.parameters(), *teacher.buffers()]))
    bf16 = train_memory(TINY_FLUX, der.student_config, RES, TEXT, BATCH, mixed_precision="bf16")
    assert bf16[TEACHER_WEIGHTS] == real(teacher.parameters()) // 2 and bf16[STUDENT_WEIGHTS] == mem[STUDENT_WEIGHTS] * 2


@pytest.mark.parametrize("attention", ["flash", "math"])
def test_saved_activations_on_meta_equal_a_real_cpu_forward(attention):
    """The meta measurement equals what saved_tensors_hooks sees on a real CPU forward + KD loss of a tiny Flux,
    with PyTorch's CPU flash kernel (attention="flash": the stand-in saves what the kernel saves) and its math path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bksdm.memory import STUDENT_ACTIVATIONS, TEACHER_OUTPUTS, measure_step, train_memory

    der = _derivation()
    teacher, student = _real_models(der)
    backend = SDPBackend.FLASH_ATTENTION if attention == "flash" else SDPBackend.MATH
    with sdpa_kernel(backend):  # the real kernel, not the stand-in
        real = measure_step(teacher, student, _call(), der.layer_pairs, attention="math")
    meta = train_memory(TINY_FLUX, der.student_config, RES, TEXT, BATCH, mixed_precision="no",
                        feature_points=der.layer_pairs, attention=attention)
    assert meta[STUDENT_ACTIVATIONS] == real[STUDENT_ACTIVATIONS] > 0
    assert meta[TEACHER_OUTPUTS] == real[TEACHER_OUTPUTS] > 0
    # bf16 on meta saves half of most tensors; the log-sum-exp, RMSNorm's and the rotary embedding's float32
    # internals and the float32 KD loss do not shrink
    half = train_memory(TINY_FLUX, der.student_config, RES, TEXT, BATCH, feature_points=der.layer_pairs,
                        attention=attention)
    assert 0.45 * meta[STUDENT_ACTIVATIONS] < half[STUDENT_ACTIVATIONS] < 0.8 * meta[STUDENT_ACTIVATIONS]


def test_measuring_leaves_a_working_graph_and_counts_views_once():
    from bksdm.memory import recording_saved, storage_bytes

    x = torch.randn(4, 8, requires_grad=True)
    with recording_saved() as saved:
        y = (x * 2).sin()  # sin saves x * 2 (a product with a constant saves nothing)
        z = y.view(8, 4).cos().sum() + y.cos().sum()  # y saved twice, once through a view
    z.backward()
    assert x.grad is not None
    assert storage_bytes(saved) == 2 * 4 * 8 * 4  # x * 2 and y once: the view shares y's storage
    assert storage_bytes(saved, exclude=[y]) == 4 * 8 * 4


def test_checkpointing_and_sharding_change_the_right_parts():
    from bksdm.memory import (AUTOCAST_WEIGHT_COPIES, EMA_WEIGHTS, FEATURE_HOOKS_RECOMPUTE, STUDENT_GRADS, FSDP_UNSHARDED_UNITS,
                              STUDENT_ACTIVATIONS, TOTAL, train_memory)

    der = _derivation()
    args = (TINY_FLUX, der.student_config, RES, TEXT, BATCH)
    plain = train_memory(*args, feature_points=der.layer_pairs)
    ckpt = train_memory(*args, feature_points=der.layer_pairs, gradient_checkpointing=True)
    assert ckpt[STUDENT_ACTIVATIONS] < plain[STUDENT_ACTIVATIONS] and ckpt[FEATURE_HOOKS_RECOMPUTE] > 0
    two = train_memory(*args, feature_points=der.layer_pairs, shards=2)
    assert two[STUDENT_ACTIVATIONS] == plain[STUDENT_ACTIVATIONS] and two[FSDP_UNSHARDED_UNITS] > 0
    assert plain[AUTOCAST_WEIGHT_COPIES] > 0 == two[AUTOCAST_WEIGHT_COPIES]
    assert plain[TOTAL] == sum(v for k, v in plain.items() if k != TOTAL)
    assert train_memory(*args, ema=True, shards=2)[EMA_WEIGHTS] == two[STUDENT_GRADS] > 0 == two[EMA_WEIGHTS]
    with pytest.raises(ValueError, match="optimizer"):
        train_memory(*args, optimizer="sgd")


def test_adamw8bit_layout():
    from bksdm.memory import optimizer_bytes

    assert optimizer_bytes([100], "adamw8bit") == 800  # below min_8bit_size: two float32 states
    assert optimizer_bytes([4096], "adamw8bit") == 2 * (4096 + 4 * 16 + 4 * 256)
    assert optimizer_bytes([10, 20]) == 8 * 30 + 8


# FLUX.1-dev -> Flux-Mini, 1024 px, batch 1, 512 text tokens, bf16, AdamW, flash attention, feature KD at the
# derivation's 15 segment ends: GiB per GPU by shards (docs/sharding.md has the table)
FLUX_MINI_PARAMS, FLUX_DEV_PARAMS = 3_179_199_552, 11_901_408_320


def test_flux_dev_to_flux_mini_per_gpu_on_meta():
    from bksdm.arch import dit
    from bksdm.arch.dit_configs import DIT_CONFIGS
    from bksdm.arch.spec import load_spec
    from bksdm.memory import (FSDP_UNSHARDED_UNITS, OPTIMIZER_STATES, STUDENT_ACTIVATIONS, STUDENT_GRADS,
                              STUDENT_WEIGHTS, TEACHER_OUTPUTS, TEACHER_WEIGHTS, TOTAL, train_memory)

    t = DIT_CONFIGS["flux-dev"]
    der = dit.derive(t, load_spec("flux-mini", t), with_keys=False)
    rows = {n: train_memory(t, der.student_config, 1024, 512, 1, shards=n, feature_points=der.layer_pairs)
            for n in (1, 2, 4, 8)}
    one = rows[1]
    assert one[TEACHER_WEIGHTS] == FLUX_DEV_PARAMS * 2  # 22.17 GiB: the teacher alone nearly fills a 24 GB card
    assert one[STUDENT_WEIGHTS] == one[STUDENT_GRADS] == FLUX_MINI_PARAMS * 4
    assert one[OPTIMIZER_STATES] == FLUX_MINI_PARAMS * 8 + 4 * sum(1 for _ in dit.meta_model(
        {**der.student_config, "_class_name": t["_class_name"]}).parameters())
    # measured on meta: 4,096 image + 512 text tokens, width 3,072, 5 double + 10 single blocks
    assert one[STUDENT_ACTIVATIONS] == pytest.approx(11.93 * 2**30, rel=0.01)
    assert one[TEACHER_OUTPUTS] == pytest.approx(0.38 * 2**30, rel=0.05)
    for n, r in rows.items():
        assert r[STUDENT_ACTIVATIONS] == one[STUDENT_ACTIVATIONS]
        assert r[TEACHER_WEIGHTS] == -(-one[TEACHER_WEIGHTS] // n)
        assert (r[FSDP_UNSHARDED_UNITS] > 0) == (n > 1)
    totals = [rows[n][TOTAL] / 2**30 for n in (1, 2, 4, 8)]
    assert totals == sorted(totals, reverse=True)
    assert totals[0] > 80 and totals[3] < 24  # more than one 80 GB card holds; eight shards: under 24 GiB


# ---------------------------------------------------------------- FSDP2 on two CPU processes
def _fsdp_worker(out_path: str) -> None:
    """One rank: teacher (frozen, sharded), student (FSDP2 units per block + root) with feature hooks registered
    before sharding, one AdamW step on this rank's batch; rank 0 compares the gathered full state dict with the same
    step taken unsharded on both ranks' batches (FSDP averages gradients over ranks)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from bksdm.distill.hooks import FeatureHooks

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    der = _derivation()
    teacher, student = _real_models(der)
    reference = copy.deepcopy(student)
    pairs = der.layer_pairs

    def loss_of(t_model, s_model, t_hooks, s_hooks, call):
        with torch.no_grad():
            t_out = t_model(**call).sample
        s_out = s_model(**call).sample
        loss = torch.nn.functional.mse_loss(s_out, t_out)
        feats = list(zip(s_hooks.pop(), t_hooks.pop()))
        for s, t in feats:
            loss = loss + torch.nn.functional.mse_loss(s, t)
        return loss, [tuple(s.shape) for s, _ in feats]

    t_hooks = FeatureHooks(teacher, [t for t, _ in pairs], "teacher")
    s_hooks = FeatureHooks(student, [s for _, s in pairs], "student")
    for model in (student, teacher):
        for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
            fully_shard(block)
        fully_shard(model)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    local = sum(p.to_local().numel() for p in student.parameters())
    loss, shapes = loss_of(teacher, student, t_hooks, s_hooks, _call(seed=rank))
    loss.backward()
    opt.step()
    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        t_plain = _real_models(der)[0]
        rt, rs = FeatureHooks(t_plain, [t for t, _ in pairs]), FeatureHooks(reference, [s for _, s in pairs])
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
        ref_loss = sum(loss_of(t_plain, reference, rt, rs, _call(seed=r))[0] for r in range(world)) / world
        ref_loss.backward()
        ref_opt.step()
        ref = reference.state_dict()
        diff = max((full[k] - ref[k]).abs().max().item() for k in ref)
        moved = max((full[k] - v).abs().max().item() for k, v in _real_models(der)[1].state_dict().items())
        Path(out_path).write_text(json.dumps({
            "world": world, "local_numel": local, "full_numel": sum(p.numel() for p in reference.parameters()),
            "feature_shapes": shapes, "image_tokens": _call()["hidden_states"].shape[1],
            "teacher_trainable": sum(p.requires_grad for p in teacher.parameters()),
            "keys_equal": sorted(full) == sorted(ref), "max_diff": diff, "moved": moved}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_cpu_processes_frozen_teacher_student_and_hooks(tmp_path):
    """FSDP2 (``fully_shard``) on 2 CPU processes with gloo: hooks registered before sharding still see every block
    output, the frozen teacher shards too, and one step equals the unsharded step on both batches."""
    out = tmp_path / "fsdp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["world"] == 2 and got["local_numel"] * 2 >= got["full_numel"] > got["local_numel"]
    assert got["feature_shapes"] == [[BATCH, got["image_tokens"], 32]] * len(_derivation().layer_pairs)
    assert got["teacher_trainable"] == 0 and got["keys_equal"]
    assert got["moved"] > 1e-3 and got["max_diff"] < 2e-5


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parents[1]))
    _fsdp_worker(sys.argv[1])
