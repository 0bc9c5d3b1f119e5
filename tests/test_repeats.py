"""Identical trailing context tokens merged (bksdm.arch.repeats): the SD3 transformer's output and gradients equal
the unmerged model's, in the mini SD3 teacher's layout (24 CLIP + 256 zero tokens) and through the pipeline."""

import copy

import torch

from bksdm.arch.repeats import RepeatMergingProcessor, merge_repeats, trailing_repeats
from bksdm.mini.model import build_sd3_pipeline, sd3_transformer_config


def _transformer(layers=3):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel.from_config(sd3_transformer_config(layers=layers, text_width=16, pooled_width=16))


def _inputs(batch=3, clip=5, zeros=40):
    torch.manual_seed(1)
    ehs = torch.cat([torch.randn(batch, clip, 16), torch.zeros(batch, zeros, 16)], dim=1)
    return dict(hidden_states=torch.randn(batch, 12, 16, 16), encoder_hidden_states=ehs,
                pooled_projections=torch.randn(batch, 16), timestep=torch.tensor([10.0, 500.0, 990.0][:batch]))


def test_trailing_repeats_counts_the_shortest_run_over_the_batch():
    x = torch.zeros(2, 6, 3)
    x[0, :2] = 1.0
    x[1, :4] = torch.arange(12.0).view(4, 3)
    assert trailing_repeats(x) == 2  # row 0 ends in 4 equal tokens, row 1 in 2
    assert trailing_repeats(torch.randn(2, 6, 3)) == 1


def test_merged_transformer_equals_the_original_with_gradients():
    plain = _transformer()
    merged = copy.deepcopy(plain)
    assert merge_repeats(merged) and merge_repeats(merged)  # idempotent
    assert isinstance(merged.transformer_blocks[0].attn.processor, RepeatMergingProcessor)
    seen = []
    merged.transformer_blocks[0].register_forward_hook(lambda m, a, out: seen.append(out[0].shape[1]))
    kw = _inputs()
    out_plain, out_merged = plain(**kw).sample, merged(**kw).sample
    assert seen == [5 + 1]  # the context stream ran 6 tokens, not 45
    assert torch.allclose(out_plain, out_merged, atol=2e-5, rtol=1e-4), (out_plain - out_merged).abs().max()
    out_plain.square().mean().backward()
    out_merged.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), merged.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-3), name


def test_a_replaced_processor_turns_merging_off_and_the_output_stays_right():
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    plain, merged = _transformer(2), _transformer(2)
    merge_repeats(merged)
    merged.set_attn_processor(JointAttnProcessor2_0())  # as a LoRA loader or a user might
    kw = _inputs()
    assert torch.allclose(plain(**kw).sample, merged(**kw).sample, atol=1e-6)


def test_pipeline_images_unchanged_and_a_foreign_processor_is_left_alone():
    pipe = build_sd3_pipeline(["a", "red", "circle"], image_size=16)
    kw = dict(prompt=["a red circle", "circle"], num_inference_steps=3, height=16, width=16, output_type="np",
              max_sequence_length=64)
    before = pipe(**kw, generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    assert merge_repeats(pipe.transformer)
    after = pipe(**kw, generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    assert abs(before - after).max() < 1e-4

    other = _transformer(2)
    other.transformer_blocks[1].attn.set_processor(type("Custom", (), {"__call__": lambda *a, **k: None})())
    assert not merge_repeats(other)
    assert not isinstance(other.transformer_blocks[0].attn.processor, RepeatMergingProcessor)


def test_nothing_to_merge_without_an_sd3_transformer():
    assert merge_repeats(torch.nn.Linear(2, 2)) is False


def test_bf16_autocast_merged_is_as_close_to_fp64_as_the_original():
    """256 zeros, as the SD3 pipeline without T5 feeds them: the merged attention runs in fp32 (ln 256 has no exact
    bf16 value), so under bf16 autocast it is as close to the fp64 model as the plain one: the rest of the bf16
    computation dominates both errors (RMS 0.003699 merged against 0.003691 plain here, max 0.0143 against 0.0147)."""
    plain = _transformer(2)
    merged = copy.deepcopy(plain)
    merge_repeats(merged)
    kw = _inputs(batch=2, clip=24, zeros=256)
    exact = copy.deepcopy(plain).double()(**{k: v.double() for k, v in kw.items()}).sample
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_plain, out_merged = plain(**kw).sample, merged(**kw).sample
    assert out_merged.dtype == out_plain.dtype
    err_plain = (out_plain.double() - exact).square().mean().sqrt()
    err_merged = (out_merged.double() - exact).square().mean().sqrt()
    assert err_merged <= 1.01 * err_plain, (err_plain, err_merged)


def test_positional_arguments_and_token_gradients():
    """encoder_hidden_states and joint_attention_kwargs passed by position are merged as by name; tokens that want
    their own gradient (CLIP encoders trained with the transformer) are merged too, and each token of the run gets
    the gradient the plain model gives it."""
    plain, merged = _transformer(2), _transformer(2)
    merge_repeats(merged)
    kw = _inputs()
    args = (kw["hidden_states"], kw["encoder_hidden_states"], kw["pooled_projections"], kw["timestep"], None, {})
    assert torch.allclose(plain(*args).sample, merged(*args).sample, atol=2e-5)
    seen = []
    merged.transformer_blocks[0].register_forward_hook(lambda m, a, out: seen.append(out[0].shape[1]))
    ehs_a = kw["encoder_hidden_states"].clone().requires_grad_()
    ehs_b = kw["encoder_hidden_states"].clone().requires_grad_()
    plain(**{**kw, "encoder_hidden_states": ehs_a}).sample.sum().backward()
    merged(**{**kw, "encoder_hidden_states": ehs_b}).sample.sum().backward()
    assert seen == [6]  # merged: 5 CLIP tokens and one for the 40 zeros
    assert ehs_a.grad[:, 5:].abs().min() > 0  # the run's tokens do get a gradient, each its own share
    assert torch.allclose(ehs_a.grad, ehs_b.grad, atol=1e-6, rtol=1e-4), (ehs_a.grad - ehs_b.grad).abs().max()


def test_merging_during_a_bypass_covers_the_restored_block():
    """`bksdm rank` bypasses a block (bksdm.arch.dit.bypass): merging switched on then skips the pass-through, and
    the block put back afterwards is merged too on the next call, with outputs equal to the plain model's."""
    from bksdm.arch.dit import bypass

    plain, merged = _transformer(3), _transformer(3)
    kw = _inputs()
    with torch.no_grad(), bypass(plain, "transformer_blocks", 1), bypass(merged, "transformer_blocks", 1):
        assert merge_repeats(merged)
        assert torch.allclose(plain(**kw).sample, merged(**kw).sample, atol=2e-5, rtol=1e-4)
    assert not isinstance(merged.transformer_blocks[1].attn.processor, RepeatMergingProcessor)  # restored, plain
    assert merge_repeats(merged)
    assert all(isinstance(b.attn.processor, RepeatMergingProcessor) for b in merged.transformer_blocks)
    with torch.no_grad():
        assert torch.allclose(plain(**kw).sample, merged(**kw).sample, atol=2e-5, rtol=1e-4)
