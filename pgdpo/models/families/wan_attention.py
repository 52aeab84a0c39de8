"""Wan attention with fewer passes over memory than diffusers' processor, same function.

Two steps of diffusers' `WanAttnProcessor` cost more than their arithmetic on CPU:

- The rotary embedding rotates queries and keys with four multiplications, two additions and
  two strided writes per tensor. Read as complex numbers, each pair of channels turns by one
  complex product, which reads and writes the tensor once (`apply_rotary`).
- The RMS norm of queries and keys gets its backward pass from autograd as a chain of
  element-wise steps on CPU. `rms_norm` computes the same gradient with fewer passes.

With `train.lora.forward` and fused AdamW they shorten the shapes-world base's eager training
step by about a quarter (BENCHMARKS.md, "Training step"). The terms are the same as diffusers',
computed in the same dtype, so the outputs agree to float32 rounding.
`tests/test_wan_attention.py` compares both processors on a real Wan transformer.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor


def rotary_phases(freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Return the unit complex numbers (1, S, 1, D/2) of diffusers' Wan rotary tables.

    The tables repeat each angle for the two channels of a pair, so the even channels of the
    cosine and the odd ones of the sine hold each angle once.
    """
    return torch.complex(freqs_cos[..., 0::2], freqs_sin[..., 1::2])


def apply_rotary(hidden_states: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (2i, 2i+1) of `hidden_states` (B, S, H, D) by `phases`.

    The product runs in the wider of the two dtypes, as diffusers' version does.
    """
    real_dtype = torch.promote_types(hidden_states.dtype, phases.real.dtype)
    pairs = torch.view_as_complex(hidden_states.to(real_dtype).unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * phases).flatten(-2).type_as(hidden_states)


class _RmsNormFunction(torch.autograd.Function):
    """y = x * r * weight with r = (mean(x^2) + eps)^-1/2 over the last dimension, frozen weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        inverse_rms = torch.rsqrt(torch.linalg.vecdot(x, x).unsqueeze(-1).div_(x.shape[-1]).add_(eps))
        ctx.save_for_backward(x, weight, inverse_rms)
        return (x * inverse_rms).mul_(weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, weight, inverse_rms = ctx.saved_tensors
        # dx = r * g' - x * r^3 * mean(g' * x), with g' = grad_output * weight.
        scaled = grad_output * weight
        coefficient = torch.linalg.vecdot(scaled, x).unsqueeze(-1).mul_(inverse_rms.pow(3)).div_(x.shape[-1])
        return scaled.mul_(inverse_rms).sub_(x * coefficient), None, None


def rms_norm(norm: torch.nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """Apply `norm` to `x`, through `_RmsNormFunction` where its backward pass is the faster one.

    That is float32 on CPU with a gradient to `x` and a frozen weight. Elsewhere (other devices
    and dtypes, inference, trainable norms) the module runs as it is.
    """
    weight = norm.weight
    if (
        x.device.type != "cpu"
        or x.dtype != torch.float32
        or not (torch.is_grad_enabled() and x.requires_grad)
        or weight is None
        or weight.requires_grad
        or weight.dtype != x.dtype
        or tuple(norm.normalized_shape) != (x.shape[-1],)
    ):
        return norm(x)
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    return _RmsNormFunction.apply(x, weight, eps)


class WanRotaryAttnProcessor(WanAttnProcessor):
    """`WanAttnProcessor` with `apply_rotary` and `rms_norm`.

    Image key and values (I2V), fused projections and tracing by `torch.compile` go to
    diffusers' processor unchanged: compiled kernels fuse its element-wise steps anyway, and
    complex tensors have limited support there.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if attn.add_k_proj is not None or attn.fused_projections or torch.compiler.is_compiling():
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

        self_attention = encoder_hidden_states is None
        context = hidden_states if self_attention else encoder_hidden_states
        query = rms_norm(attn.norm_q, attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = rms_norm(attn.norm_k, attn.to_k(context)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(context).unflatten(2, (attn.heads, -1))

        if rotary_emb is not None:
            phases = rotary_phases(*rotary_emb)
            query = apply_rotary(query, phases)
            key = apply_rotary(key, phases)

        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config if self_attention else None,
        )
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


def use_rotary_processor(denoiser: torch.nn.Module, enabled: bool = True) -> int:
    """Swap diffusers' `WanAttnProcessor` of every attention module of `denoiser` for a
    `WanRotaryAttnProcessor` with the same settings (attention backend, parallel config), or back
    with `enabled=False`.

    Returns the number of modules changed. Processors of other types are left alone.
    """
    source, target = (WanAttnProcessor, WanRotaryAttnProcessor) if enabled else (WanRotaryAttnProcessor, WanAttnProcessor)
    changed = 0
    for module in denoiser.modules():
        processor = getattr(module, "processor", None)
        if type(processor) is source:
            replacement = target()
            replacement.__dict__.update(processor.__dict__)
            module.processor = replacement
            changed += 1
    return changed
