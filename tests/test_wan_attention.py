"""pgdpo's Wan attention processor against diffusers' on a real (small) Wan transformer."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from peft import LoraConfig

from pgdpo.models.families.wan_attention import (
    WanRotaryAttnProcessor,
    _RmsNormFunction,
    apply_rotary,
    rms_norm,
    rotary_phases,
    use_rotary_processor,
)
from pgdpo.models.tiny_wan import TinyWanConfig, build_transformer


def _inputs(cfg: TinyWanConfig, batch: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(batch, cfg.z_dim, 3, 16, 16, generator=generator),
        "timestep": torch.tensor([100.0, 500.0, 900.0][:batch]),
        "encoder_hidden_states": torch.randn(batch, 7, cfg.text_dim, generator=generator),
    }


def _lora_transformer(cfg: TinyWanConfig) -> torch.nn.Module:
    """A Wan transformer with a nonzero rank-4 LoRA on the attention projections."""
    torch.manual_seed(0)
    model = build_transformer(cfg)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def _output_and_grads(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    output = model(**inputs, return_dict=False)[0]
    (output.square().mean()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return output.detach(), grads


def test_processor_matches_diffusers():
    cfg = TinyWanConfig()
    stock = _lora_transformer(cfg)
    fast = copy.deepcopy(stock)
    assert use_rotary_processor(fast) == 2 * cfg.num_layers  # self- and cross-attention per block
    assert all(type(m.processor) is WanAttnProcessor for m in stock.modules() if hasattr(m, "processor"))

    inputs = _inputs(cfg)
    out_stock, grads_stock = _output_and_grads(stock, inputs)
    out_fast, grads_fast = _output_and_grads(fast, inputs)

    assert out_stock.abs().mean() > 0.1
    torch.testing.assert_close(out_fast, out_stock, rtol=1e-5, atol=1e-6)
    assert grads_fast.keys() == grads_stock.keys()
    assert len(grads_stock) == 16 * cfg.num_layers  # 2 attentions x 4 projections x (A, B)
    for name, grad in grads_stock.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads_fast[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_processor_swap_keeps_settings():
    model = build_transformer(TinyWanConfig(num_layers=1))
    model.blocks[0].attn1.processor._attention_backend = "native"

    assert use_rotary_processor(model) == 2
    assert type(model.blocks[0].attn1.processor) is WanRotaryAttnProcessor
    assert model.blocks[0].attn1.processor._attention_backend == "native"
    assert use_rotary_processor(model) == 0  # already swapped

    assert use_rotary_processor(model, enabled=False) == 2
    assert type(model.blocks[0].attn1.processor) is WanAttnProcessor
    assert model.blocks[0].attn1.processor._attention_backend == "native"


@pytest.mark.parametrize("table_dtype", [torch.float32, torch.float64])
def test_rotary_matches_pairwise_formula(table_dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=generator)
    angles = torch.rand(1, 5, 1, 4, generator=generator, dtype=table_dtype) * 6.28
    cos = angles.cos().repeat_interleave(2, dim=-1)
    sin = angles.sin().repeat_interleave(2, dim=-1)

    rotated = apply_rotary(x, rotary_phases(cos, sin))

    even, odd = x[..., 0::2].to(table_dtype), x[..., 1::2].to(table_dtype)
    expected = torch.stack([even * angles.cos() - odd * angles.sin(), even * angles.sin() + odd * angles.cos()], -1)
    assert rotated.dtype == x.dtype
    torch.testing.assert_close(rotated, expected.flatten(-2).float(), rtol=1e-6, atol=1e-6)
    # A rotation keeps the length of every channel pair.
    torch.testing.assert_close(rotated.square().sum(-1), x.square().sum(-1), rtol=1e-5, atol=1e-5)


def test_rms_norm_gradient():
    generator = torch.Generator().manual_seed(0)
    norm = torch.nn.RMSNorm(16, eps=1e-6).requires_grad_(False)
    norm.weight.copy_(1 + 0.1 * torch.randn(16, generator=generator))
    x = torch.randn(4, 6, 16, generator=generator)

    # The analytic backward against finite differences, in float64.
    x64 = x.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: _RmsNormFunction.apply(t, norm.weight.double(), 1e-6), (x64,))

    # Against the module in float32: same values and gradients, through the custom function.
    upstream = torch.randn(4, 6, 16, generator=generator)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fast = rms_norm(norm, a)
    assert fast.grad_fn is not None
    assert "RmsNormFunction" in type(fast.grad_fn).__name__
    fast.backward(upstream)
    norm(b).backward(upstream)
    torch.testing.assert_close(fast.detach(), norm(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)

    # Without a gradient to x, or with a trainable weight, the module runs.
    assert rms_norm(norm, x).grad_fn is None
    norm.weight.requires_grad_(True)
    assert "RmsNormFunction" not in type(rms_norm(norm, x.clone().requires_grad_(True)).grad_fn).__name__
