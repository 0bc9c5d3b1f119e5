"""Transformer backbones (SD3 / SD3.5 MMDiT, FLUX.1): specs, derivation, key map, feature points, compress, inspect,
profile. Tiny random transformers are built here; full-size configs only on the meta device."""

from __future__ import annotations

import json

import pytest
import torch

from bksdm.arch import dit, load_spec
from bksdm.arch.derive import map_keys
from bksdm.arch.dit_configs import DIT_CONFIGS
from bksdm.arch.transfer import init_student_from_teacher
from bksdm.cli import main
from bksdm.distill.hooks import FeatureHooks
from bksdm.errors import UserError
from tests.conftest import one_line_error

# SD3.5-style: dual attention in blocks 0, 1, 3 of 5, qk norm; block 4 is built with context_pre_only
TINY_SD3 = dict(_class_name="SD3Transformer2DModel", sample_size=8, patch_size=1, in_channels=4, num_layers=5,
                attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16, dual_attention_layers=[0, 1, 3],
                qk_norm="rms_norm")
TINY_FLUX = dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=4, num_layers=3, num_single_layers=4,
                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                 axes_dims_rope=[4, 4, 8], guidance_embeds=True)
TEXT, SIDE = 6, 8  # text tokens; latent side (SD3: 8x8 patches of 1 = 64 image tokens; FLUX: 64 packed tokens)


def build(config: dict, seed: int = 0) -> torch.nn.Module:
    """A tiny transformer with every tensor drawn at random (so that no block is an identity by initialisation)."""
    import diffusers

    torch.manual_seed(seed)
    model = getattr(diffusers, config["_class_name"]).from_config({k: v for k, v in config.items() if k != "_class_name"})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def inputs(config: dict, batch: int = 2) -> dict:
    gen = torch.Generator().manual_seed(1)
    cond = {"encoder_hidden_states": torch.randn(batch, TEXT, config["joint_attention_dim"], generator=gen),
            "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], generator=gen)}
    if config["_class_name"] == "SD3Transformer2DModel":
        return {"hidden_states": torch.randn(batch, 4, SIDE, SIDE, generator=gen), "timestep": torch.tensor([300.0, 700.0]), **cond}
    ids = torch.stack(torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij"), -1).reshape(-1, 2)
    return {"hidden_states": torch.randn(batch, SIDE * SIDE, 4, generator=gen), "timestep": torch.tensor([0.3, 0.7]),
            "img_ids": torch.cat([torch.zeros(SIDE * SIDE, 1), ids.float()], 1), "txt_ids": torch.zeros(TEXT, 3),
            "guidance": torch.tensor([3.5, 3.5]), **cond}


def run(model, kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**kw, return_dict=False)[0]


# ---------------------------------------------------------------- the key test: bypass == derived student
@pytest.mark.parametrize("config", [TINY_SD3, TINY_FLUX], ids=["sd3", "flux"])
def test_bypassed_teacher_equals_derived_student_for_every_removable_block(config):
    teacher, kw = build(config), inputs(config)
    full = run(teacher, kw)
    removable = dit.removable_blocks(config)
    assert len(removable) == (4 if config is TINY_SD3 else 7)
    for name, i in removable:
        der = dit.derive(config, dit.spec_without(config, name, i))
        student = init_student_from_teacher(teacher, der).eval()
        with dit.bypass(teacher, name, i):
            bypassed = run(teacher, kw)
        assert not torch.allclose(bypassed, full), (name, i)  # the block matters: the test can fail
        torch.testing.assert_close(run(student, kw), bypassed, rtol=0, atol=1e-6, msg=f"{name}.{i}")
        if config is TINY_SD3:  # diffusers' own skip equals both
            with torch.no_grad():
                skipped = teacher(**kw, skip_layers=[i], return_dict=False)[0]
            torch.testing.assert_close(skipped, bypassed, rtol=0, atol=1e-6)
    assert torch.equal(run(teacher, kw), full)  # every bypass restored the block


def test_sd35_dual_attention_renumbered_and_last_block_rule():
    spec = dit.DiTSpec("x", (("transformer_blocks", (0, 2, 3, 4)),))
    der = dit.derive(TINY_SD3, spec)
    assert der.student_config["num_layers"] == 4 and der.student_config["dual_attention_layers"] == [0, 2]
    assert ("transformer_blocks.1", "transformer_blocks.2") in der.module_map
    assert ("pos_embed", "pos_embed") in der.module_map  # every other top-level module maps to itself
    assert "pos_embed.pos_embed" in der.key_map  # the persistent buffer is mapped too
    with pytest.raises(UserError, match="last block must be the teacher's last block 4") as exc:
        dit.derive(TINY_SD3, dit.DiTSpec("x", (("transformer_blocks", (0, 1, 3)),)))
    assert "\n" not in str(exc.value) and "context_pre_only" in str(exc.value)


def test_key_map_asserts_coverage_reuse_unused_and_block_names(monkeypatch):
    der = dit.derive(TINY_FLUX, dit.DiTSpec("x", (("transformer_blocks", (0, 2)), ("single_transformer_blocks", (1, 3)))))
    t_shapes = dit.tensor_shapes(TINY_FLUX)
    s_shapes = dit.tensor_shapes({**der.student_config, "_class_name": TINY_FLUX["_class_name"]})
    assert len(der.key_map) == len(s_shapes) and len(set(der.key_map.values())) == len(s_shapes)
    assert der.key_map["transformer_blocks.1.attn.to_q.weight"] == "transformer_blocks.2.attn.to_q.weight"
    assert der.key_map["single_transformer_blocks.0.proj_out.weight"] == "single_transformer_blocks.1.proj_out.weight"
    assert all(k.startswith(("transformer_blocks.1.", "single_transformer_blocks.0.", "single_transformer_blocks.2."))
               for k in der.unused_teacher_keys)
    roots = ("transformer_blocks", "single_transformer_blocks")
    without_block = [m for m in der.module_map if m[0] != "transformer_blocks.1"]
    with pytest.raises(AssertionError, match="not covered"):  # no silent fall-back to the same-numbered block
        map_keys(without_block, s_shapes, t_shapes, roots=roots)
    twice = [m if m[0] != "transformer_blocks.1" else ("transformer_blocks.1", "transformer_blocks.0") for m in der.module_map]
    with pytest.raises(AssertionError, match="same teacher tensor"):
        map_keys(twice, s_shapes, t_shapes, roots=roots)
    into_single = [m if m[0] != "transformer_blocks.1" else ("transformer_blocks.1", "single_transformer_blocks.0")
                   for m in der.module_map]
    with pytest.raises(UserError, match="which the teacher does not have"):
        map_keys(into_single, s_shapes, t_shapes, roots=roots)
    # a student config that is not the spec's (dual attention not renumbered) fails on the block's tensor names
    monkeypatch.setattr(dit, "student_config", lambda cfg, kept: {**{k: v for k, v in cfg.items() if k != "_class_name"},
                                                                   "num_layers": 4})
    with pytest.raises(AssertionError, match="differ in tensor .*attn2"):
        dit.derive(TINY_SD3, dit.DiTSpec("x", (("transformer_blocks", (0, 2, 3, 4)),)))


def test_spec_errors_are_one_line():
    bad = [({"keep": {"blocks": [0]}}, "unknown block list 'blocks'"),
           ({"keep": {"transformer_blocks": [2, 1]}}, "increasing order"),
           ({"keep": {"transformer_blocks": [0, 0, 2]}}, "increasing order"),
           ({"keep": {"transformer_blocks": [0, 3]}}, "names block 3"),
           ({"keep": {"transformer_blocks": []}}, "non-empty list"),
           ({"keep": {}}, "must map block-list names"),
           ({"keep": {"transformer_blocks": [0]}, "down": []}, "keys name and keep")]
    for data, message in bad:
        with pytest.raises(UserError, match=message) as exc:
            dit.check_spec(dit.DiTSpec.from_dict(data), TINY_FLUX)
        assert "\n" not in str(exc.value)


def test_load_spec_dispatches_on_the_teacher_kind(tmp_path):
    dit_file, unet_file = tmp_path / "d.yaml", tmp_path / "u.yaml"
    dit_file.write_text("keep:\n  single_transformer_blocks: [0, 3]\n")
    unet_file.write_text("down: [[0], [0], [0], [0]]\nmid: true\nup: [[0, 2], [0, 2], [0, 2], [0, 2]]\n")
    spec = load_spec(dit_file, TINY_FLUX)
    assert spec.name == "d" and spec.kept(TINY_FLUX) == {"transformer_blocks": [0, 1, 2], "single_transformer_blocks": [0, 3]}
    with pytest.raises(UserError, match="is a U-Net spec"):
        load_spec(unet_file, TINY_FLUX)
    with pytest.raises(UserError, match="is a transformer spec"):
        load_spec(dit_file, {"down_block_types": ["CrossAttnDownBlock2D"] * 4})
    with pytest.raises(UserError, match="FLUX.1 .* transformer teachers"):
        load_spec("flux-mini", {"down_block_types": ["CrossAttnDownBlock2D"] * 4})
    with pytest.raises(UserError, match="SDXL teachers"):
        load_spec("koala-1b", TINY_FLUX)
    assert "flux-mini" not in dit.builtin_specs(TINY_FLUX)  # only for 19 + 38 blocks


def test_builtin_rules():
    assert dit.bk_keep(19, "bk-base") == [0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 13, 14, 15, 16, 17, 18]
    assert dit.bk_keep(24, "bk-small") == [0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23]
    assert dit.bk_keep(24, "bk-tiny") == [0, 1, 3, 5, 7, 16, 18, 20, 22, 23]
    for name in DIT_CONFIGS:  # every built-in derives on every full-size teacher (SD3 keeps its last block)
        for spec in dit.builtin_specs(DIT_CONFIGS[name]).values():
            dit.derive(DIT_CONFIGS[name], spec)


# ---------------------------------------------------------------- feature points
@pytest.mark.parametrize("config", [TINY_SD3, TINY_FLUX], ids=["sd3", "flux"])
def test_feature_points_pick_the_image_stream(config):
    teacher, kw = build(config), inputs(config)
    spec = dit.builtin_specs(config)["bk-small"]
    der = dit.derive(config, spec)
    student = init_student_from_teacher(teacher, der).eval()
    t_hooks = FeatureHooks(teacher, [t for t, _ in der.layer_pairs], "teacher")
    s_hooks = FeatureHooks(student, [s for _, s in der.layer_pairs], "student")
    run(teacher, kw), run(student, kw)
    pairs = list(zip(t_hooks.pop(), s_hooks.pop()))
    assert len(pairs) == sum(len(v) for v in spec.kept(config).values())
    for f_t, f_s in pairs:  # image tokens, never text tokens (TEXT) nor SD3's last block's None
        assert f_t.shape == f_s.shape == (2, SIDE * SIDE, teacher.inner_dim)
    last = dit.block_counts(config)["transformer_blocks"] - 1
    assert der.layer_pairs[len(spec.kept(config)["transformer_blocks"]) - 1][0] == f"transformer_blocks.{last}#1"
    json.dumps(der.record())  # the picks serialise into bksdm.json


def test_unet_hooks_unchanged_for_bare_names():
    hooks = FeatureHooks(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["0"])
    hooks._hook("x")(None, None, (torch.ones(1), torch.zeros(1)))  # a tuple without a pick: its first item
    assert torch.equal(hooks.features["x"], torch.ones(1))


# ---------------------------------------------------------------- full size, meta only
def test_full_size_counts_on_meta():
    assert dit.param_count(DIT_CONFIGS["flux-dev"]) == 11_901_408_320
    assert dit.param_count(DIT_CONFIGS["flux-schnell"]) == 11_891_178_560
    assert dit.param_count(DIT_CONFIGS["sd3.5-large"]) == 8_056_627_520
    assert dit.param_count(DIT_CONFIGS["sd3.5-medium"]) == 2_243_171_520
    assert dit.param_count(DIT_CONFIGS["sd3-medium"]) == 2_028_328_000
    flux = DIT_CONFIGS["flux-dev"]
    der = dit.derive(flux, load_spec("flux-mini", flux))
    assert (der.student_config["num_layers"], der.student_config["num_single_layers"]) == (5, 10)
    assert dit.param_count({**der.student_config, "_class_name": flux["_class_name"]}) == 3_179_199_552
    medium = dit.derive(DIT_CONFIGS["sd3.5-medium"], load_spec("bk-small", DIT_CONFIGS["sd3.5-medium"]))
    assert medium.student_config["dual_attention_layers"] == list(range(8))  # teacher blocks 0-7 kept, 8-12 removed
    # the built-in students' counts in docs/architecture.md
    for arch, counts in (("flux-dev", (9_890_771_776, 7_540_303_936, 4_765_060_672)),
                         ("sd3.5-large", (6_565_629_760, 5_074_632_000, 2_944_635_200)),
                         ("sd3.5-medium", (1_870_195_648, 1_480_693_824, 921_230_016))):
        cfg = DIT_CONFIGS[arch]
        for name, count in zip(("bk-base", "bk-small", "bk-tiny"), counts):
            student = dit.derive(cfg, load_spec(name, cfg)).student_config
            assert dit.param_count({**student, "_class_name": cfg["_class_name"]}) == count, (arch, name)


def test_profile_cli_transformer_counts(capsys, tmp_path):
    assert main(["profile", "--arch", "flux-dev", "--student", "flux-mini", "--no-latency", "--json"]) == 0
    teacher, mini = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert teacher["transformer_params"] == 11_901_408_320 and mini["transformer_params"] == 3_179_199_552
    assert mini["blocks"] == {"transformer_blocks": 5, "single_transformer_blocks": 10}
    assert 0 < mini["transformer_gmacs"] < teacher["transformer_gmacs"] < teacher["transformer_gmacs_with_scores"]
    assert "not profiled yet" in teacher["note"]
    assert main(["profile", "--arch", "sd3.5-large", "--no-latency"]) == 0
    assert "8,056,627,520" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("keep:\n  transformer_blocks: [0, 1, 2]\n")
    assert main(["profile", "--arch", "sd3.5-medium", "--student", str(bad), "--no-latency"]) == 2
    assert "last block must be the teacher's last block 23" in one_line_error(capsys)
    assert main(["profile", "--arch", "flux-dev"]) == 2
    assert "--no-latency" in one_line_error(capsys)


# ---------------------------------------------------------------- compress and inspect
def _pipeline_folder(tmp_path, config, name) -> str:
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = tmp_path / name
    build(config).save_pretrained(folder / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    pipe = "FluxPipeline" if config["_class_name"] == "FluxTransformer2DModel" else "StableDiffusion3Pipeline"
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipe, "transformer": ["diffusers", config["_class_name"]],
                                                         "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    return str(folder)


@pytest.mark.parametrize("config", [TINY_SD3, TINY_FLUX], ids=["sd3", "flux"])
def test_compress_and_inspect_transformer_pipeline(tmp_path, capsys, config):
    import diffusers

    teacher_dir = _pipeline_folder(tmp_path, config, "teacher")
    out = tmp_path / "student"
    assert main(["compress", "--teacher", teacher_dir, "--student", "bk-small", "--out", str(out)]) == 0
    assert "transformer" in capsys.readouterr().out
    rec = json.loads((out / "bksdm.json").read_text())
    assert rec["backbone"] == config["_class_name"] and rec["spec"]["name"] == "bk-small"
    assert (out / "scheduler" / "scheduler_config.json").is_file()  # the rest of the pipeline is copied
    cls = getattr(diffusers, config["_class_name"])
    student, teacher = cls.from_pretrained(out / "transformer"), cls.from_pretrained(f"{teacher_dir}/transformer")
    t_sd = teacher.state_dict()
    for key, value in student.state_dict().items():
        assert torch.equal(value, t_sd[rec["key_map"][key]])
    assert rec["params"]["student_transformer"] < rec["params"]["teacher_transformer"]
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    kept = dit.builtin_specs(config)["bk-small"].kept(config)
    for row in info["block_lists"]:
        assert row["kept"] == kept[row["list"]] and row["removed"] == [i for i in range(row["teacher_blocks"])
                                                                       if i not in kept[row["list"]]]
        assert 0 < row["student_gmacs"] < row["teacher_gmacs"]
    assert main(["inspect", str(out)]) == 0
    assert "| transformer_blocks |" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("keep:\n  transformer_blocks: [1, 0]\n")
    assert main(["compress", "--teacher", teacher_dir, "--student", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "increasing order" in one_line_error(capsys)
