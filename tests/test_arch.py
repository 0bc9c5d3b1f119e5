"""Block removal: exact paper architectures, key maps, layer pairs, custom specs and their errors."""

from __future__ import annotations

import pytest
import torch

from bksdm.arch import BUILTIN_SPECS, BlockSpec, derive, init_student_from_teacher, load_spec
from bksdm.arch.families import family_unet_config
from bksdm.errors import UserError
from bksdm.profile import count_gmacs, count_params

# facts.md section 1: exact U-Net parameters and GMACs per call (batch 1, 64x64 latent)
SD_V1 = {None: (859_520_964, 338.6), "bk-base": (579_384_964, 223.7), "bk-small": (482_346_884, 217.6),
         "bk-tiny": (323_384_964, 205.0)}
SD_V2_BASE = {None: 865_910_724, "bk-base": 583_480_964, "bk-small": 485_787_524, "bk-tiny": 326_825_604}


def _meta_unet(cfg):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(cfg)


def _student_cfg(family, student):
    cfg = family_unet_config(family)
    return cfg if student is None else derive(cfg, BUILTIN_SPECS[student], with_keys=False).student_config


@pytest.mark.parametrize("student", list(SD_V1))
def test_sd_v1_params_and_macs(student):
    unet = _meta_unet(_student_cfg("sd-v1", student))
    params, gmacs = SD_V1[student]
    assert count_params(unet) == params
    x, t, e = torch.randn(1, 4, 64, 64, device="meta"), torch.tensor([1], device="meta"), torch.randn(1, 77, 768, device="meta")
    paper, with_scores = count_gmacs(lambda: unet(x, t, e))
    assert paper == pytest.approx(gmacs, rel=0.005)
    assert with_scores > paper  # attention-score products are counted separately


@pytest.mark.parametrize("student", list(SD_V2_BASE))
def test_sd_v2_base_params(student):
    assert count_params(_meta_unet(_student_cfg("sd-v2-base", student))) == SD_V2_BASE[student]


def test_sd_v2_768_keeps_upcast_and_sample_size():
    cfg = _student_cfg("sd-v2", "bk-tiny")
    assert cfg["upcast_attention"] is True and cfg["sample_size"] == 96
    assert cfg["attention_head_dim"] == [5, 10, 20] and cfg["block_out_channels"] == [320, 640, 1280]


def _expected_base_map():
    """facts.md section 2: the public BK-SDM Base/Small initialisation."""
    m = {}
    for i in range(4):
        m[f"down_blocks.{i}.resnets.0"] = f"down_blocks.{i}.resnets.0"
        m[f"up_blocks.{i}.resnets.0"] = f"up_blocks.{i}.resnets.0"
        m[f"up_blocks.{i}.resnets.1"] = f"up_blocks.{i}.resnets.2"
        if i < 3:
            m[f"down_blocks.{i}.attentions.0"] = f"down_blocks.{i}.attentions.0"
            m[f"down_blocks.{i}.downsamplers.0"] = f"down_blocks.{i}.downsamplers.0"
            m[f"up_blocks.{i}.upsamplers.0"] = f"up_blocks.{i}.upsamplers.0"
        if i > 0:
            m[f"up_blocks.{i}.attentions.0"] = f"up_blocks.{i}.attentions.0"
            m[f"up_blocks.{i}.attentions.1"] = f"up_blocks.{i}.attentions.2"
    return m


@pytest.mark.parametrize("student", ["bk-base", "bk-small"])
def test_base_small_module_map_and_pairs(student):
    d = derive(family_unet_config("sd-v1"), BUILTIN_SPECS[student])
    expected = _expected_base_map()
    if student == "bk-base":
        expected["mid_block"] = "mid_block"
    assert dict(d.module_map) == expected
    assert d.layer_pairs == [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(4)] + [
        (f"up_blocks.{i}", f"up_blocks.{i}") for i in range(4)]
    assert any(k.startswith("mid_block") for k in d.key_map) == (student == "bk-base")


def test_tiny_module_map_and_pairs():
    d = derive(family_unet_config("sd-v1"), BUILTIN_SPECS["bk-tiny"])
    m = dict(d.module_map)
    for j in range(3):  # student up_blocks.j <- teacher up_blocks.j+1
        assert m[f"up_blocks.{j}.resnets.0"] == f"up_blocks.{j + 1}.resnets.0"
        assert m[f"up_blocks.{j}.resnets.1"] == f"up_blocks.{j + 1}.resnets.2"
        assert m[f"up_blocks.{j}.attentions.1"] == f"up_blocks.{j + 1}.attentions.2"
    assert m["up_blocks.0.upsamplers.0"] == "up_blocks.1.upsamplers.0"
    assert m["up_blocks.1.upsamplers.0"] == "up_blocks.2.upsamplers.0"
    assert "up_blocks.2.upsamplers.0" not in m and "down_blocks.2.downsamplers.0" not in m
    assert d.layer_pairs == [
        ("down_blocks.0", "down_blocks.0"), ("down_blocks.1", "down_blocks.1"),
        ("down_blocks.2.attentions.1.proj_out", "down_blocks.2.attentions.0.proj_out"),
        ("up_blocks.1", "up_blocks.0"), ("up_blocks.2", "up_blocks.1"), ("up_blocks.3", "up_blocks.2"),
    ]
    assert any(k.startswith("down_blocks.3") for k in d.unused_teacher_keys)
    assert any(k.startswith("up_blocks.0.") for k in d.unused_teacher_keys)


@pytest.mark.parametrize("student", list(BUILTIN_SPECS))
def test_every_student_tensor_equals_its_teacher_tensor(student):
    from tests.conftest import make_tiny_pipeline

    teacher = make_tiny_pipeline().unet
    d = derive(dict(teacher.config), BUILTIN_SPECS[student])
    s = init_student_from_teacher(teacher, d)
    t_sd, s_sd = teacher.state_dict(), s.state_dict()
    assert set(d.key_map) == set(s_sd)
    assert len(d.key_map) + len(d.unused_teacher_keys) == len(t_sd)
    for k, v in s_sd.items():
        assert torch.equal(v, t_sd[d.key_map[k]]), k
    # the student runs and produces the teacher's output shape
    x = torch.randn(1, 12, 16, 16)
    e = torch.randn(1, 5, 16)
    assert s(x, 3, e).sample.shape == x.shape


def test_custom_spec_file(tmp_path):
    path = tmp_path / "outer.yaml"
    path.write_text("name: outer-heavy\ndown: [[0, 1], [0], [0], [0]]\nmid: true\nup: [[0, 2], [0, 2], [0, 2], [0, 1, 2]]\n")
    spec = load_spec(path)
    d = derive(family_unet_config("sd-v1"), spec)
    assert d.student_config["layers_per_block"] == [2, 1, 1, 1]
    assert dict(d.module_map)["up_blocks.3.resnets.2"] == "up_blocks.3.resnets.2"
    unet = _meta_unet(d.student_config)
    assert set(unet.state_dict()) == set(d.key_map)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"down": [[0, 2], [0], [0], [0]], "mid": True, "up": [[0, 2]] * 4}, "has pairs 0..1"),
        ({"down": [[0]] * 4, "mid": True, "up": [[0, 3]] * 4}, "has pairs 0..2"),
        ({"down": [[0], None, [0], [0]], "mid": False, "up": [[0, 2], [0, 2], None, [0, 2]]}, "only the innermost"),
        ({"down": [[0]] * 3 + [None], "mid": False, "up": [[0, 2]] * 4}, "only the innermost"),
        ({"down": [[0]] * 4, "mid": True, "up": [[0, 1, 2]] + [[0, 2]] * 3}, "skip connections"),
        ({"down": [[0]] * 3, "mid": True, "up": [[0, 2]] * 3}, "teacher has 4"),
    ],
)
def test_bad_specs(data, message):
    with pytest.raises(UserError, match=message):
        derive(family_unet_config("sd-v1"), BlockSpec.from_dict(data))


def test_unknown_spec_key_and_name():
    with pytest.raises(UserError, match="unknown key"):
        BlockSpec.from_dict({"down": [[0]], "mid": True, "up": [[0]], "keep": 1})
    with pytest.raises(UserError, match="bk-base, bk-small, bk-tiny"):
        load_spec("bk-huge")


def test_inconsistent_or_foreign_teacher_rejected():
    cfg = family_unet_config("sd-v1")
    cfg.update(transformer_layers_per_block=[1, 2, 10])  # three depths for four stages
    with pytest.raises(UserError, match="transformer_layers_per_block has 3 entries.*supported: SD-v1.x"):
        derive(cfg, BUILTIN_SPECS["bk-base"])
    cfg = family_unet_config("sd-v1") | {"addition_embed_type": "image"}
    with pytest.raises(UserError, match="addition_embed_type='image'.*SDXL"):
        derive(cfg, BUILTIN_SPECS["bk-base"])


def test_family_seam_for_sd_layouts():
    """Every SD-v1/v2 family calls its U-Net with one text encoder's hidden states, at its own resolution; SDXL's
    has two text encoders and added conditioning; other added conditioning is refused with what is supported."""
    from bksdm.arch.families import FAMILIES, family_component_config, family_of
    from bksdm.errors import UserError

    sizes = {}
    for name in [n for n in FAMILIES if n != "sdxl"]:
        fam = family_of(family_component_config(name, "unet"))
        assert fam.text_components == ("tokenizer", "text_encoder") and fam.pipeline_class == "StableDiffusionPipeline"
        sizes[name] = fam.resolution(family_component_config(name, "unet"))
        cond = fam.from_cache({"emb": torch.zeros(2, 77, 8)})
        assert list(cond) == ["encoder_hidden_states"] and fam.to_cache(cond)["emb"].shape == (2, 77, 8)
        assert fam.prediction_type({"prediction_type": FAMILIES[name]["prediction_type"]}) == FAMILIES[name]["prediction_type"]
    assert sizes == {"sd-v1": 512, "sd-v2-base": 512, "sd-v2": 768}
    xl = family_of(family_component_config("sdxl", "unet"))
    assert xl.pipeline_class == "StableDiffusionXLPipeline" and xl.resolution(family_component_config("sdxl", "unet")) == 1024
    cond = xl.from_cache({"emb": torch.zeros(2, 77, 8), "pooled": torch.ones(2, 4)}) | xl.added_conditioning(2, 1024, "cpu")
    kw = xl.unet_kwargs(cond)
    assert set(kw) == {"encoder_hidden_states", "added_cond_kwargs"} and set(kw["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    with pytest.raises(UserError, match="addition_embed_type='image' are not supported.*SDXL"):
        family_of({"addition_embed_type": "image", "cross_attention_dim": 2048})
