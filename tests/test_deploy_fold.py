"""``dynconv.deploy``: BatchNorms folded into the layers before them, exactly, for every conv family.

References: a BatchNorm in eval mode is ``gamma (y - mean) / sqrt(var + eps) + beta`` (Ioffe & Szegedy,
arXiv:1502.03167, Algorithm 2), so the deployed layer must give the original layer's output followed by the
original BatchNorm on the same input (checked per fold, float64), and the deployed network the original
network's output. Every BatchNorm has trained-like statistics and random affine parameters first: a fresh
BatchNorm is close to the identity and would hide a fold that forgets its scale or shift.
"""
from __future__ import annotations

import copy
import json
from typing import Dict, List, Tuple

import pytest
import torch
from torch import nn

import dynconv
from dynconv.deploy import bn_affine, deploy
from dynconv.fused_attention import FusedDYAttention, FusedKWAttention, FusedODAttention

_BN = nn.modules.batchnorm._BatchNorm
ALL_CONVS = dynconv.list_convs()


def calibrated(arch: str, conv: str, x: torch.Tensor) -> nn.Module:
    """An ``arch`` / ``conv`` model in ``x``'s dtype and eval mode whose BatchNorms have random affine
    parameters and the statistics of a batch holding ``x`` (cumulative average of one training pass): far
    from the fresh mean 0 / variance 1, and the activations stay in range."""
    torch.manual_seed(0)
    model = dynconv.create_model(arch, conv, num_classes=10).to(x.dtype)
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith("gamma"):  # ConvNeXt's layer scale starts at 1e-6: blocks would barely count
            p.data.uniform_(0.5, 1.0, generator=g)
    norms = [m for m in model.modules() if isinstance(m, _BN)]
    for m in norms:
        if m.weight is not None:
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        m.momentum = None
    model.train()
    with torch.no_grad():
        # DCD and DGC multiply activations by input-dependent factors: statistics from x alone keep a deep
        # fresh net's eval activations in range; the attention BatchNorms of the other families normalise
        # pooled vectors, which need more than x's two samples
        extra = 0 if conv in ("dcd", "dgc") else 6
        model(torch.cat([x, torch.randn(extra, *x.shape[1:], generator=g, dtype=x.dtype)]))
    for m in norms:
        m.momentum = 0.1
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


@torch.no_grad()
def rounding_sensitivity(model: nn.Module, x: torch.Tensor, eps: float) -> float:
    """How far ``model(x)`` moves when every weight changes by a relative ``eps`` (rounding level): the
    tolerance of a whole-network comparison, whose own rounding the network amplifies as much."""
    jiggled = copy.deepcopy(model)
    g = torch.Generator().manual_seed(4)
    for p in jiggled.parameters():
        p.mul_(1 + eps * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return (jiggled(x) - model(x)).abs().max().item()


def check_deploy(arch: str, conv: str, size: int = 32, folds_expected: bool = True
                 ) -> Tuple[nn.Module, nn.Module, list]:
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model = calibrated(arch, conv, x)
    before = copy.deepcopy(model.state_dict())
    report: list = []
    deployed = deploy(model, report=report)
    folds = [(layer, bn) for layer, bn in report if layer]
    assert bool(folds) == folds_expected, folds

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
        # a fresh dynamic net can amplify rounding by orders of magnitude (the folds above are each exact)
        tol = max(tol, 100 * rounding_sensitivity(model, x, 1e-15))
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


# every variant on ResNet18 but the two that differ from their neighbours in widths only (odconv_2x, kw_2x);
# on MobileNetV2 (BatchNormAct, depthwise layers, KW's hand-built 1/2x plan with
# its dynamic classifier) one variant per family, plus ODConv 1x, whose pointwise layers take a static path
MOBILENETV2_CONVS = ["static", "se", "cbam", "eca", "condconv_8x", "dyconv_4x", "dcd", "odconv_1x", "odconv_4x",
                     "kw_1d2x", "dgc", "icconv"]


@pytest.mark.parametrize("arch,conv", [("resnet18", c) for c in ALL_CONVS if c not in ("odconv_2x", "kw_2x")]
                         + [("mobilenetv2_050", c) for c in MOBILENETV2_CONVS])
def test_deploy_is_exact_and_folds_every_norm(arch, conv):
    model, deployed, report = check_deploy(arch, conv)
    assert _norms(deployed) == _expected_left(arch, conv, model)


@pytest.mark.parametrize("conv,fused", [("odconv_4x", FusedODAttention), ("odconv_1x", FusedODAttention),
                                        ("dyconv_4x", FusedDYAttention), ("kw_1x", FusedKWAttention),
                                        ("kw_1d4x", FusedKWAttention)])
def test_deploy_puts_attentions_in_their_inference_form(conv, fused):
    """Every attention of the family is in its inference form (:mod:`dynconv.fused_attention`: stacked heads,
    folded BatchNorm and temperature) after ``deploy``, so the exactness checks above run through it, and each
    gives what the module form gives on the same input, at batch 2 and 1 (float64)."""
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model = calibrated("resnet18", conv, x)
    deployed = deploy(model)
    names = [n for n, m in model.named_modules() if isinstance(m, fused.__mro__[1])]
    assert names and all(type(deployed.get_submodule(n)) is fused for n in names)
    inputs = _capture(model, names, "in", x)
    with torch.no_grad():
        for name in names:
            for xi in (inputs[name], inputs[name][:1]):
                want, got = model.get_submodule(name)(xi), deployed.get_submodule(name)(xi)
                for w, g in zip(*(t if isinstance(t, tuple) else (t,) for t in (want, got))):
                    if w is None:
                        assert g is None, name
                        continue
                    torch.testing.assert_close(g, w, rtol=0, atol=1e-12 * max(w.abs().max().item(), 1.0),
                                               msg=f"{conv}: {name}")


def test_bn_affine_is_the_eval_batchnorm():
    bn = nn.BatchNorm2d(5).double().eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    y = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    scale, shift = bn_affine(bn)
    torch.testing.assert_close(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), bn(y), rtol=0, atol=1e-13)


# Bottlenecks (static, DCD's 1x1-pool attention, CondConv's stage-4 rule, DGC's three-conv blocks) at 64 px, where
# layer4 still has 2x2 maps; ConvNeXt: LayerNorms everywhere, so only the attention branches' BatchNorms fold
# (ODConv, DCD, CBAM's none) and KW, whose ConvNeXt attention uses LayerNorm, has nothing to fold at all.
@pytest.mark.parametrize("arch,conv,size,folds_expected", [
    ("resnet50", "static", 64, True),
    ("resnet50", "condconv_8x", 64, True),
    ("resnet50", "dcd", 64, True),
    ("resnet50", "kw_1d2x", 64, True),
    ("resnet50", "dgc", 64, True),
    ("convnext_tiny", "odconv_4x", 32, True),
    ("convnext_tiny", "dcd", 32, True),
    ("convnext_tiny", "kw_1d4x", 32, False),
])
def test_deploy_on_bottlenecks_and_convnext(arch, conv, size, folds_expected):
    model, deployed, _ = check_deploy(arch, conv, size, folds_expected)
    assert _norms(deployed) == _expected_left(arch, conv, model)


ONNX_CONVS = ["static", "condconv_8x", "dyconv_4x", "dcd", "odconv_1x", "odconv_4x", "kw_1x", "dgc", "icconv"]


@pytest.mark.slow
@pytest.mark.parametrize("conv", ONNX_CONVS)
def test_deployed_model_exports_to_onnx_with_a_dynamic_batch(conv, tmp_path):
    """A deployed ResNet18 exports (``torch.onnx.export(dynamo=True)``, symbolic batch) and onnxruntime gives
    the deployed and the original model's outputs at batch 1 and 3 (float32; statistics calibrated in float64
    on the 3 images)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model = calibrated("resnet18", conv, x).float()
    x = x.float()
    deployed = deploy(model)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(deployed, (x[:2],), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    program.save(str(tmp_path / "deployed.onnx"))
    session = ort.InferenceSession(str(tmp_path / "deployed.onnx"))
    name = session.get_inputs()[0].name
    assert session.get_inputs()[0].shape[0] not in (1, 2)  # symbolic, not the example's batch
    for size in (1, 3):
        with torch.no_grad():
            want, original = deployed(x[:size]), model(x[:size])
        got = torch.from_numpy(session.run(None, {name: x[:size].numpy()})[0])
        # float32: within what rounding-level changes of the weights do to this network (see above)
        tol = max(1e-5 * want.abs().max().item(), 100 * rounding_sensitivity(deployed, x[:size], 1e-7))
        torch.testing.assert_close(got, want, rtol=0, atol=tol)
        torch.testing.assert_close(got, original, rtol=0, atol=tol)


@pytest.mark.slow
def test_eval_py_deploy_gives_the_same_scores(tmp_path):
    """``eval.py deploy=true`` scores the deployed copy of a trained checkpoint (BatchNorm statistics of one
    epoch): the same top-1 and loss as the model itself, and every block norm folded."""
    from cli import TINY, ok, run

    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    model = ["model=resnet18", "conv=odconv_1x"]
    ok(run("train.py", TINY + model + ["recipe.epochs=1", "recipe.scheduler.warmup_epochs=0"], run_dir, cache))
    args = TINY[:4] + model + [f"checkpoint={run_dir / 'last.pt'}", "bench_batches=0"]
    plain = json.loads(ok(run("eval.py", args, tmp_path / "eval", cache)).stdout.split("\nwritten to")[0])
    deployed = json.loads(ok(run("eval.py", args + ["deploy=true"], tmp_path / "eval2", cache)).stdout
                          .split("\nwritten to")[0])
    assert "deployed_norms_folded" not in plain
    # ResNet18 ODConv: 20 block / stem / downsample norms and 16 attention norms (test above)
    assert deployed["deployed_norms_folded"] == 36
    assert deployed["num_images"] == plain["num_images"] == 16
    assert deployed["top1"] == plain["top1"]
    assert deployed["loss"] == pytest.approx(plain["loss"], rel=1e-5)
