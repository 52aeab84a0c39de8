"""pgdpo's Wan VAE norm against diffusers' on a real (small) Wan VAE."""

from __future__ import annotations

import copy

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

from pgdpo.models.families.wan_vae import FastWanRmsNorm, use_fast_vae_norm
from pgdpo.models.tiny_wan import TinyWanConfig, build_vae


def test_norm_matches_diffusers():
    generator = torch.Generator().manual_seed(0)
    stock = WanRMS_norm(6, channel_first=True, images=False, bias=True)
    with torch.no_grad():
        stock.gamma.copy_(1 + 0.1 * torch.randn(stock.gamma.shape, generator=generator))
        stock.bias.copy_(0.1 * torch.randn(stock.bias.shape, generator=generator))
    fast = copy.deepcopy(stock)
    assert use_fast_vae_norm(fast) == 1
    assert type(fast) is FastWanRmsNorm

    x = torch.randn(2, 6, 3, 4, 4, generator=generator)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_stock, out_fast = stock(a), fast(b)
    upstream = torch.randn(out_stock.shape, generator=generator)
    out_stock.backward(upstream)
    out_fast.backward(upstream)

    torch.testing.assert_close(out_fast, out_stock, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast.gamma.grad, stock.gamma.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast.bias.grad, stock.bias.grad, rtol=1e-4, atol=1e-6)


def test_norm_of_zero_input():
    fast = WanRMS_norm(4, channel_first=False, images=True)
    use_fast_vae_norm(fast)
    # F.normalize divides by max(norm, 1e-12), so an all-zero input stays zero instead of NaN.
    output = fast(torch.zeros(2, 3, 4))
    assert torch.equal(output, torch.zeros(2, 3, 4))


def test_vae_decode_matches_diffusers():
    torch.manual_seed(0)
    stock = build_vae(TinyWanConfig()).eval()
    fast = copy.deepcopy(stock)
    changed = use_fast_vae_norm(fast)
    assert changed == sum(isinstance(m, WanRMS_norm) for m in stock.modules())
    assert changed > 10

    latents = torch.randn(2, 8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = stock.decode(latents).sample
        decoded = fast.decode(latents).sample
    assert expected.abs().mean() > 0.01
    torch.testing.assert_close(decoded, expected, rtol=1e-4, atol=1e-5)

    assert use_fast_vae_norm(fast, enabled=False) == changed
    assert all(type(m) is not FastWanRmsNorm for m in fast.modules())
