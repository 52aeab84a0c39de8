"""pgdpo's LoRA forward forms against peft's own forward."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from pgdpo.training.lora_forward import FastLoraLinear, set_lora_forward


class _Net(torch.nn.Module):
    """A narrow and a wide linear layer, the second above `MERGE_MAX_WEIGHT`."""

    def __init__(self):
        super().__init__()
        self.narrow = torch.nn.Linear(32, 64)
        self.wide = torch.nn.Linear(64, 1100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wide(torch.nn.functional.gelu(self.narrow(x)))


def _lora_net(dropout: float = 0.0) -> _Net:
    torch.manual_seed(0)
    net = _Net()
    # alpha != rank, so the scaling factor (4.0) must be applied.
    config = LoraConfig(r=4, lora_alpha=16, lora_dropout=dropout, target_modules=["narrow", "wide"])
    inject_adapter_in_model(config, net)
    net.requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    for name, parameter in net.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
            parameter.requires_grad_(True)
    return net


def _run(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    net.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    output = net(x)
    output.square().mean().backward()
    return output.detach(), [x.grad] + [p.grad for p in net.parameters() if p.requires_grad]


@pytest.mark.parametrize("form", ["merged", "fused", "auto"])
def test_forms_match_peft(form):
    x = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(2))
    reference = _lora_net()
    candidate = copy.deepcopy(reference)
    counts = set_lora_forward(candidate, form)

    expected = {"merged": {"merged": 2}, "fused": {"fused": 2}, "auto": {"merged": 1, "fused": 1}}[form]
    assert counts == expected
    assert type(candidate.narrow) is FastLoraLinear

    out_ref, grads_ref = _run(reference, x)
    out_new, grads_new = _run(candidate, x)
    # The LoRA branch must matter, or the comparison would not test it.
    for layer in (reference.narrow, reference.wide):
        layer.enable_adapters(False)
    with torch.no_grad():
        assert (reference(x) - out_ref).abs().max() > 0.05
    torch.testing.assert_close(out_new, out_ref, rtol=1e-5, atol=1e-6)
    assert len(grads_new) == 5
    for new, ref in zip(grads_new, grads_ref, strict=True):
        torch.testing.assert_close(new, ref, rtol=1e-4, atol=1e-6)


def test_peft_form_restores_class():
    net = _lora_net()
    set_lora_forward(net, "merged")
    assert set_lora_forward(net, "peft") == {"peft": 2}
    assert type(net.narrow) is PeftLoraLinear
    assert type(net.wide) is PeftLoraLinear


def test_disabled_adapters_run_base():
    x = torch.randn(2, 32)
    net = _lora_net()
    set_lora_forward(net, "merged")
    net.narrow.enable_adapters(False)
    torch.testing.assert_close(net.narrow(x), net.narrow.base_layer(x), rtol=0, atol=0)


def test_dropout_falls_back_to_peft():
    x = torch.randn(4, 32)
    reference, candidate = _lora_net(dropout=0.5), _lora_net(dropout=0.5)
    set_lora_forward(candidate, "merged")
    torch.manual_seed(3)
    expected = reference.narrow(x)
    torch.manual_seed(3)
    # Same dropout mask from the same seed: the layer ran peft's forward, bit for bit.
    torch.testing.assert_close(candidate.narrow(x), expected, rtol=0, atol=0)


def test_bf16_base_falls_back_to_peft():
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    reference = _lora_net()
    reference.narrow.base_layer.to(torch.bfloat16)
    candidate = copy.deepcopy(reference)
    set_lora_forward(candidate, "merged")
    torch.testing.assert_close(candidate.narrow(x), reference.narrow(x), rtol=0, atol=0)


def test_fast_layers_pickle_and_keep_keys():
    net = _lora_net()
    keys = list(net.state_dict())
    set_lora_forward(net, "auto")
    assert list(net.state_dict()) == keys
    restored = pickle.loads(pickle.dumps(net))
    assert type(restored.wide) is FastLoraLinear
    assert restored.wide.lora_form == "fused"
    assert restored.narrow.lora_form == "merged"


def test_unknown_form_rejected():
    with pytest.raises(ValueError, match="train.lora.forward"):
        set_lora_forward(_lora_net(), "fast")
