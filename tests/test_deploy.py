"""Deployment: every conv variant under ``torch.compile(fullgraph=True)`` and exported to ONNX with a
dynamic batch size (onnxruntime against PyTorch at batch 1 and 5), and batch-1 inference on the
plain-conv path."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dynconv
import dynconv.ops.functional as functional

DYNAMIC = [c for c in dynconv.list_convs() if c not in ("static", "se", "cbam", "eca")]
# one variant per family for the compile test (the variants of a family share their forward)
FAMILIES = ["condconv_8x", "dyconv_4x", "dcd", "odconv_4x", "odconv_1x", "kw_1x", "dgc", "icconv"]


class SmallCNN(nn.Module):
    """A stem and three convs (3x3, strided 3x3, 1x1) with BatchNorm: what ``dynconv.convert`` makes
    dynamic on any CNN (every conv but the first)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def small_dynamic_cnn(conv: str) -> nn.Module:
    """A converted SmallCNN in eval mode with BatchNorm statistics of random images, so that every
    layer's output stays in a normal range (a fresh net's running statistics do not normalise)."""
    torch.manual_seed(0)
    model = SmallCNN()
    dynconv.convert(model, conv)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 16, 16))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    return model.eval()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles SmallCNN.forward anew: the variants would otherwise pile up as recompiles of
    the one code object and hit dynamo's recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# FDConv at 16 px only: at 224 px (test_compile_fullgraph_at_real_sizes) one forward + backward of its ResNet18 at
# batch 4 takes ~30 s on this 2-core CPU (per-sample FFTs, KSM products and FBM of every layer); the test took 2
# minutes alone and hit the 10-minute timeout on the shared machine
@pytest.mark.parametrize("conv", FAMILIES + ["fdconv"])
def test_compile_fullgraph_matches_eager(conv):
    """Dynamo traces forward and backward without a graph break (``fullgraph=True`` raises on one);
    the ``aot_eager`` backend runs the traced graphs, so the check does not wait for C++ builds."""
    model = small_dynamic_cnn(conv)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        # one sample: ODConv's and KW's batch-1 inference paths, which the compiler traces too
        torch.testing.assert_close(compiled(x[:1]), model(x[:1]), rtol=1e-4, atol=1e-5)
    model.train()
    out = compiled(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(x).sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_compile_with_inductor_matches_eager():
    """The default backend (C++ code generation) on the ODConv network, forward and backward."""
    model = small_dynamic_cnn("odconv_4x").train()
    x = torch.randn(4, 3, 16, 16)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    grad = model.body[0].weight.grad.clone()
    model.zero_grad()
    expected = model(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    reference = model.body[0].weight.grad  # a sum over the batch's pixels: reassociation, scaled tolerance
    torch.testing.assert_close(grad, reference, rtol=1e-3, atol=1e-4 * reference.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("conv", DYNAMIC)
def test_onnx_export_with_a_dynamic_batch_matches_pytorch(conv, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = small_dynamic_cnn(conv)
    batch = torch.export.Dim("batch", min=1, max=256)
    program = torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), dynamo=True, dynamic_shapes=({0: batch},),
                                verbose=False)
    program.save(str(tmp_path / "model.onnx"))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    name = session.get_inputs()[0].name
    assert session.get_inputs()[0].shape[0] not in (1, 2)  # symbolic, not the example's batch
    for size in (1, 5):
        x = torch.randn(size, 3, 16, 16)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {name: x.numpy()})[0]
        assert got.shape == expected.shape
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(expected), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("conv", ["condconv_8x", "dyconv_4x", "odconv_4x", "kw_1x"])
def test_batch_one_inference_runs_plain_convs(conv, monkeypatch):
    """At batch 1 every per-sample conv is one ordinary conv with the aggregated kernel (no grouped
    or matmul path), and gives what the batched paths give."""
    model = small_dynamic_cnn(conv)
    chosen = []
    original = functional.choose_path_for  # every path decision goes through it (choose_path calls it)

    def spy(*args, **kwargs):
        chosen.append(original(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(functional, "choose_path_for", spy)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        single = torch.cat([model(x[i:i + 1]) for i in range(3)])
        assert chosen and set(chosen) == {"plain"}
        chosen.clear()
        batched = model(x)
    assert "plain" not in chosen
    torch.testing.assert_close(single, batched, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch,conv,layer", [("resnet18", "odconv_4x", "ODConv2d"), ("resnet18", "dcd", "DCDConv2d"),
                                             ("mobilenetv2_050", "kw_1d2x", "KWConv2d"),
                                             ("resnet18", "dgc", "DGCConv2d")])
def test_torchscript_refuses_with_the_layer_named(arch, conv, layer):
    model = dynconv.create_model(arch, conv, num_classes=3).eval()
    with pytest.raises(RuntimeError, match=rf"^{layer} cannot be compiled with TorchScript"):
        torch.jit.script(model)


def test_torchscript_still_scripts_the_attention_baselines():
    model = dynconv.create_model("resnet18", "se", num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(torch.jit.script(model)(x), model(x), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("conv", ["kw_1d4x", "odconv_4x"])
def test_deployed_batch_one_compiles_with_inductor(conv):
    """A deployed model at batch 1 under the default backend (C++ code generation), as the latency benchmark
    compiles it: ODConv's and KernelWarehouse's batch-1 paths, which the compiler traces, including KW's
    kernel assembly from its permuted cells (which inductor rejected written into a view with ``out=``)."""
    torch.manual_seed(0)
    model = dynconv.deploy(dynconv.create_model("resnet18", conv, num_classes=10).eval())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("conv", FAMILIES)
def test_compile_fullgraph_at_real_sizes(conv):
    """ResNet18 at 224 px, batch 1 and 4, forward and backward, without a graph break: the per-shape conv
    paths differ from the 16 px ones, and the kernel recipes must step aside while compiling (issue 17).
    The compiled forward equals eager and the compiled backward reaches every parameter with finite
    gradients; that the compiled gradients equal eager's is checked at 16 px above (at 224 px a fresh
    network's float32 attention gradients are too ill-conditioned to compare). IC-Conv at batch 4 only:
    dynamo needs about 3 minutes to trace its ResNet18 on this CPU."""
    torch.manual_seed(0)
    model = dynconv.create_model("resnet18", conv, num_classes=10).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for batch in ((4,) if conv == "icconv" else (1, 4)):
        x = torch.randn(batch, 3, 224, 224)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        out = compiled(x)
        out.sum().backward()
        model.load_state_dict(state)  # the same BatchNorm statistics for the eager pass
        with torch.no_grad():
            torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
        missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not missing, missing[:5]
        model.zero_grad()
