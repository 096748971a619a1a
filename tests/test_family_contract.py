"""The contract every conv family keeps, checked the same way for each one in ``dynconv.list_families()``.

A family (built in, or a researcher's own registered with ``dynconv.register_family``) must convert every arch,
count its parameters and MACs, train at batch 1 and 4, follow ``set_progress``, survive a checkpoint round trip,
compile as one graph, export to ONNX with a dynamic batch, and build through timm (``features_only`` included).
A family that breaks one fails ``test_<check>[<family>]`` by name.

Families defined outside dynconv join through ``DYNCONV_CONTRACT_FAMILIES`` (module files or names, separated by
``os.pathsep``), imported at collection: ``test_examples.py`` runs this module that way in a subprocess for
``examples/custom_family``, so the registration stays out of the other tests' processes.
"""
from __future__ import annotations

import os

import pytest
import timm
import torch
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

import dynconv
from dynconv.archs import create_backbone
from dynconv.checkpoint import atomic_save, load_checkpoint
from dynconv.ops import DynamicConv2dBase
from dynconv.schedules import scheduled_modules

for _spec in filter(None, os.environ.get("DYNCONV_CONTRACT_FAMILIES", "").split(os.pathsep)):
    dynconv.load_family_module(_spec)

FAMILIES = [dynconv.get_family(name) for name in dynconv.list_families()]
ONLY = os.environ.get("DYNCONV_CONTRACT_ONLY")  # a family name: check only that one
if ONLY:
    FAMILIES = [f for f in FAMILIES if f.name == ONLY]
family_param = pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)


def _variant(family: dynconv.Family) -> dynconv.ConvVariant:
    return family.variants[0]


def tiny_resnet(num_classes: int = 5) -> nn.Module:
    """A four-block ResNet with timm's module names, so every backbone rule applies, small enough to compile and
    export quickly."""
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes, channels=(16, 32, 64, 128), stem_width=16,
                  zero_init_last=False)


def converted(family: dynconv.Family) -> nn.Module:
    """``tiny_resnet`` with the family's first variant applied as ``create_model`` applies it."""
    variant = _variant(family)
    model = tiny_resnet()
    dynconv.convert(model, variant.name)
    if family.prepare is not None:
        family.prepare(model, dict(variant.options))
    return model


def _dynamic_types(family: dynconv.Family) -> set:
    return {cls.__name__ for cls in family.layers}


@family_param
@pytest.mark.parametrize("arch", dynconv.list_archs())
def test_surgery_on_every_arch(family, arch):
    """The family converts each arch: the report names layers of the family's own classes (nothing for the
    identity family), and the converted model runs forward."""
    variant = _variant(family)
    model = create_backbone(arch, 10, dynamic=not family.is_identity)
    report = dynconv.convert(model, variant.name, **family.arch_options(variant, arch))
    if family.is_identity:
        assert len(report) == 0 and report.params_after == report.params_before
    else:
        assert len(report) > 0, f"{family.name} replaced nothing on {arch}"
        if family.layers:
            assert {kind for _, kind in report.replaced} <= _dynamic_types(family)
    if family.prepare is not None:
        family.prepare(model, {**variant.options, **family.arch_options(variant, arch)})
    with torch.no_grad():  # training mode: eval with random weights and initial statistics may overflow 100 layers
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@family_param
def test_params_and_macs(family):
    """Parameters count every tensor once (shared banks too); MACs are per sample (batch 2 costs twice batch 1),
    the per-kind breakdown adds up, and the dynamic layers' convolutions are counted as theirs. (Whether a method
    costs more or less than the static net is its own: DGC prunes, IC-Conv costs the same.)"""
    static, model = tiny_resnet(), converted(family)
    params = dynconv.count_params(model)
    assert params == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    macs = dynconv.count_macs(model, (1, 3, 64, 64))
    assert dynconv.count_macs(model, (2, 3, 64, 64)) == 2 * macs
    breakdown = dynconv.macs_breakdown(model, (1, 3, 64, 64))
    assert breakdown["total"] == macs == sum(v for k, v in breakdown.items() if k != "total")
    if family.is_identity:
        assert macs == dynconv.count_macs(static, (1, 3, 64, 64)) and params == dynconv.count_params(static)
        return
    assert set(model.state_dict()) != set(static.state_dict())
    if any(issubclass(cls, DynamicConv2dBase) for cls in family.layers):
        assert breakdown["dynamic_conv"] > 0


@family_param
@pytest.mark.parametrize("batch", [1, 4])
def test_training_step(family, batch):
    """One SGD step: the loss is finite, every trainable parameter gets a finite gradient, and the step moves the
    parameters."""
    model = converted(family).train()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(batch, 3, 64, 64)), torch.randint(0, 5, (batch,)))
    loss = loss + dynconv.auxiliary_loss(model)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"{family.name}: non-finite gradient in {name}"
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@family_param
def test_set_progress_reaches_every_scheduled_layer(family):
    """``set_progress(model, e)`` gives every scheduled layer its schedule's value at ``e``, and the model's output
    depends on the progress only (going elsewhere and back gives the same output)."""
    model = converted(family).eval()
    seen = {}
    for module in scheduled_modules(model):
        original = module.set_schedule_value

        def record(value, module=module, original=original):
            seen[id(module)] = value
            original(value)

        module.set_schedule_value = record
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for epoch in (0.0, 3.5):
            seen.clear()
            dynconv.set_progress(model, epoch)
            for module in scheduled_modules(model):
                assert seen[id(module)] == module.schedule(epoch), f"{family.name}: {type(module).__name__}"
        out = model(x)
        dynconv.set_progress(model, 0.0)
        dynconv.set_progress(model, 3.5)
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)


@family_param
def test_checkpoint_round_trip(family, tmp_path):
    """A state dict written atomically and read back with ``weights_only`` into a fresh model (other seed) holds
    the same tensors and gives the same outputs, schedule position included."""
    model = converted(family)
    dynconv.set_progress(model, 2.5)
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # statistics worth carrying
        norm.running_mean.uniform_(-0.1, 0.1)
        norm.running_var.uniform_(0.5, 1.5)
    atomic_save({"model": model.state_dict()}, tmp_path / "ckpt.pt")
    torch.manual_seed(1)
    fresh = converted(family)
    fresh.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt")["model"], strict=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0, msg=key)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():  # training mode: DCD / DGC square their inputs, made-up eval statistics would overflow
        torch.testing.assert_close(fresh.train()(x), model.train()(x), rtol=0, atol=0)


@family_param
def test_compiles_as_one_graph(family):
    """``torch.compile(fullgraph=True)`` captures the whole eval forward (no graph break) and computes what eager
    does. (The dynamo ``eager`` backend: capture is the contract; inductor code is tested per path elsewhere.)"""
    torch._dynamo.reset()
    model = converted(family).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@family_param
def test_onnx_export_with_a_dynamic_batch(family, tmp_path):
    """``torch.onnx.export(dynamo=True)`` with a symbolic batch; onnxruntime equals PyTorch at batch 1 and 3 (on
    64 px inputs: every map has more than one value per channel, see ``dynconv.fresh_statistics``)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = converted(family).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(model, (torch.randn(2, 3, 64, 64),), dynamo=True, dynamic_shapes=({0: batch},),
                                verbose=False)
    program.save(str(tmp_path / "model.onnx"))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    name = session.get_inputs()[0].name
    assert session.get_inputs()[0].shape[0] not in (1, 2)  # symbolic, not the example's batch
    for size in (1, 3):
        x = torch.randn(size, 3, 64, 64)
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@family_param
def test_timm_registration(family):
    """Every variant is a timm model (``<prefix>_resnet18``) that builds converted, and ``features_only=True``
    gives the five feature maps timm's ``feature_info`` announces; the identity family adds no timm names."""
    for variant in family.variants:
        name = f"{variant.timm_prefix}_resnet18"
        if family.is_identity:
            assert name not in timm.list_models()
            continue
        assert name in timm.list_models()
        model = timm.create_model(name, num_classes=7)
        assert getattr(model, "dynconv_variant") == variant.name
        if family.layers:
            assert any(type(m).__name__ in _dynamic_types(family) for m in model.modules())
    if family.is_identity:
        return
    features = timm.create_model(f"{_variant(family).timm_prefix}_resnet18", features_only=True).eval()
    with torch.no_grad():
        maps = features(torch.randn(2, 3, 64, 64))
    assert [m.shape[1] for m in maps] == features.feature_info.channels()
    assert [64 // m.shape[-1] for m in maps] == features.feature_info.reduction()
