"""Official checkpoints give the official model's logits: a random official-layout state dict is
imported with ``dynconv.import_official`` and the dynconv model is compared, in float64, with an
independent forward pass of the official model over the same state dict (``official_reference``)."""
from __future__ import annotations

import math
from typing import Dict

import pytest
import torch
import torch.nn.functional as F

import dynconv

from official_reference import mobilenetv2_forward, resnet18_forward

FORWARDS = {"resnet18": resnet18_forward, "mobilenetv2_100": mobilenetv2_forward}
CASES = [
    ("resnet18", "static"),
    ("resnet18", "odconv_1x"),
    ("resnet18", "odconv_4x"),
    ("resnet18", "kw_1x"),
    ("resnet18", "kw_4x"),
    ("resnet18", "dcd"),
    ("resnet18", "dgc"),
    ("mobilenetv2_100", "static"),
    ("mobilenetv2_100", "odconv_4x"),
    ("mobilenetv2_100", "kw_1x"),
]


def images(batch: int) -> torch.Tensor:
    """Smooth random images: white noise alone averages out, and every image would give the same logits."""
    coarse = torch.randn(batch, 3, 4, 4, dtype=torch.float64)
    smooth = F.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False)
    return 2 * smooth + 0.3 * torch.randn(batch, 3, 64, 64, dtype=torch.float64)


def random_official_state(arch: str, conv: str) -> Dict[str, torch.Tensor]:
    """Every key and shape an official checkpoint of this model has, filled with random float64
    weights; the BatchNorm statistics are then those of random images (measured by running the
    model in training mode), so activations stay O(1) and the logits depend on the input."""
    model = dynconv.create_model(arch, conv).double()
    state = {}
    for key, like in dynconv.export_official(model, format="state_dict").items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(10)
        elif key.endswith("_inactive_channels"):  # DGC's pruning state, not a weight
            state[key] = like.clone()
        elif like.dim() == 1:  # norm weights near 1; biases, running means and variances are calibrated
            state[key] = 1 + 0.1 * torch.randn_like(like) if key.endswith(".weight") else 0.1 * torch.randn_like(like)
        else:
            fan_in = math.prod(like.shape[2:] if like.dim() == 5 else like.shape[1:])  # banks: (n, C_out, ...)
            state[key] = torch.randn_like(like) * math.sqrt(2.0 / fan_in)
    dynconv.import_official(model, state)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(images(8))
    return dynconv.export_official(model.eval(), format="state_dict")


def imported_logits(arch: str, conv: str, state: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    model = dynconv.create_model(arch, conv).double().eval()
    if "odconv" in conv or conv == "dgc":  # DataParallel files
        checkpoint = {"state_dict": {"module." + k: v for k, v in state.items()}}
    else:
        checkpoint = {"state_dict": state} if conv == "dcd" else {"model": state}
    dynconv.import_official(model, checkpoint)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("arch,conv", CASES)
def test_imported_model_gives_the_official_logits(arch, conv):
    state = random_official_state(arch, conv)
    x = images(2)
    want = FORWARDS[arch](state, x)
    # The two images give different logits, by far more than the 1e-5 tolerance below.
    assert torch.isfinite(want).all() and (want[0] - want[1]).abs().max() > 1e-3 * want.abs().max()
    got = imported_logits(arch, conv, state, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("arch,conv,a,b", [
    ("resnet18", "odconv_4x", "layer1.0.conv1.attention.kernel_fc.weight", "layer1.1.conv2.attention.kernel_fc.weight"),
    ("resnet18", "kw_1x", "layer1.0.conv2.attention.fc2.weight", "layer1.1.conv1.attention.fc2.weight"),
    ("resnet18", "dgc", "layer4.1.conv2.headconv_0.conv.weight", "layer4.1.conv2.headconv_1.conv.weight"),
    ("mobilenetv2_100", "kw_1x", "features.5.conv.1.0.attention.fc2.weight", "features.6.conv.1.0.attention.fc2.weight"),
])
def test_a_misplaced_tensor_changes_the_logits(arch, conv, a, b):
    """The comparison above is sharp: two same-shaped tensors swapped on import are caught."""
    state = random_official_state(arch, conv)
    assert state[a].shape == state[b].shape
    swapped = dict(state, **{a: state[b], b: state[a]})
    x = images(2)
    want = FORWARDS[arch](state, x)
    got = imported_logits(arch, conv, swapped, x)
    assert not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
