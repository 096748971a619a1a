"""``dynconv.deploy``: BatchNorms folded into the layers before them, exactly, for every conv family.

References: a BatchNorm in eval mode is ``gamma (y - mean) / sqrt(var + eps) + beta`` (Ioffe & Szegedy,
arXiv:1502.03167, Algorithm 2), so the deployed layer must give the original layer's output followed by the
original BatchNorm on the same input (checked per fold, float64), and the deployed network the original
network's output. Every BatchNorm has trained-like statistics and random affine parameters first: a fresh
BatchNorm is close to the identity and would hide a fold that forgets its scale or shift.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import pytest
import torch
from torch import nn

import dynconv
from dynconv.deploy import bn_affine, deploy

_BN = nn.modules.batchnorm._BatchNorm
ALL_CONVS = dynconv.list_convs()


def calibrated(arch: str, conv: str, x: torch.Tensor) -> nn.Module:
    """A float64 ``arch`` / ``conv`` model in eval mode whose BatchNorms have random affine parameters and
    the statistics of a batch holding ``x`` (cumulative average of one training pass, then the variances
    scaled by 0.75..1.25 so that no BatchNorm normalises its input exactly)."""
    torch.manual_seed(0)
    model = dynconv.create_model(arch, conv, num_classes=10).double()
    g = torch.Generator().manual_seed(1)
    norms = [m for m in model.modules() if isinstance(m, _BN)]
    for m in norms:
        if m.weight is not None:
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.cat([x, torch.randn(6, *x.shape[1:], generator=g, dtype=x.dtype)]))
    for m in norms:
        m.momentum = 0.1
        m.running_var.mul_(torch.rand(m.num_features, generator=g, dtype=m.running_var.dtype) * 0.5 + 0.75)
    return model.eval()


def _capture(model: nn.Module, names: List[str], kind: str, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Input (``kind="in"``) or output of the named modules in one eval forward pass."""
    seen: Dict[str, torch.Tensor] = {}
    hooks = []
    def keep(name: str, tensor: torch.Tensor) -> None:
        seen.setdefault(name, tensor.clone())  # the first call; a clone, before any in-place activation

    for name in names:
        module = model.get_submodule(name)
        if kind == "in":
            hooks.append(module.register_forward_pre_hook(lambda m, a, n=name: keep(n, a[0])))
        else:
            hooks.append(module.register_forward_hook(lambda m, a, o, n=name: keep(n, o)))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def check_deploy(arch: str, conv: str, size: int = 32) -> Tuple[nn.Module, nn.Module, list]:
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model = calibrated(arch, conv, x)
    before = copy.deepcopy(model.state_dict())
    report: list = []
    deployed = deploy(model, report=report)
    folds = [(layer, bn) for layer, bn in report if layer]
    assert folds, "nothing folded"

    # every fold on its own: deployed layer (and what is left of the norm) == original norm(layer(input))
    inputs = _capture(model, [layer for layer, _ in folds], "in", x)
    outputs = _capture(model, [bn for _, bn in folds], "out", x)
    with torch.no_grad():
        for layer, bn in folds:
            got = deployed.get_submodule(bn)(deployed.get_submodule(layer)(inputs[layer]))
            want = outputs[bn]
            tol = 1e-12 * max(want.abs().max().item(), 1.0)
            torch.testing.assert_close(got, want, rtol=0, atol=tol, msg=f"{arch}/{conv}: {layer} + {bn}")

    # the whole network; the tolerance scales with the output and with how much a rounding-level change of
    # the weights moves it (a fresh dynamic net can amplify rounding a lot: the folds above are each exact)
    with torch.no_grad():
        want, got = model(x), deployed(x)
        tol = 1e-11 * max(want.abs().max().item(), 1.0)
        if (got - want).abs().max().item() > tol:
            # a fresh dynamic net can amplify rounding by orders of magnitude (the folds above are each exact):
            # allow 100x what a rounding-level change of the original weights does to its output
            jiggled = copy.deepcopy(model)
            for p in jiggled.parameters():
                p.mul_(1 + 1e-15 * torch.randn_like(p))
            tol = max(tol, 100 * (jiggled(x) - want).abs().max().item())
    torch.testing.assert_close(got, want, rtol=0, atol=tol, msg=f"{arch}/{conv} network")

    # the original model is untouched, the norms are gone, the copy is inference-only
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not deployed.training
    assert not any(p.requires_grad for p in deployed.parameters())
    return model, deployed, report


def _norms(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if isinstance(m, _BN)]


# which BatchNorms stay, and why: DGC's internal pre-activation norm reads a ReLU's output on ResNet
# (no layer before it to fold into)
def _expected_left(arch: str, conv: str, model: nn.Module) -> List[str]:
    if conv == "dgc" and arch.startswith("resnet"):
        return [n for n in _norms(model) if n.endswith(".norm")]
    return []


@pytest.mark.parametrize("conv", ALL_CONVS)
@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2_050"])
def test_deploy_is_exact_and_folds_every_norm(arch, conv):
    model, deployed, report = check_deploy(arch, conv)
    assert _norms(deployed) == _expected_left(arch, conv, model)


def test_bn_affine_is_the_eval_batchnorm():
    bn = nn.BatchNorm2d(5).double().eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    y = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    scale, shift = bn_affine(bn)
    torch.testing.assert_close(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), bn(y), rtol=0, atol=1e-13)
