"""A checkpoint carries its layers' schedule state (issue 17, point 1): temperature and KernelWarehouse tau."""
from __future__ import annotations

import pytest
import timm
import torch

import dynconv
from dynconv.ops._routing import schedule_state_keys


@pytest.mark.parametrize("name,arch,conv", [("odconv4x_resnet18", "resnet18", "odconv_4x"),
                                            ("kw1x_resnet18", "resnet18", "kw_1x"),
                                            ("dyconv4x_resnet18", "resnet18", "dyconv_4x")])
def test_a_model_saved_mid_schedule_reloads_through_timm_as_it_was(tmp_path, name, arch, conv):
    torch.manual_seed(0)
    model = dynconv.create_model(arch, conv, num_classes=5).eval()
    dynconv.set_progress(model, 2.0)  # epoch 2: ODConv / DY-Conv T = 24.2, KW tau = 0.9
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "mid.pth"
    torch.save(model.state_dict(), path)
    reloaded = timm.create_model(name, num_classes=5, checkpoint_path=str(path)).eval()  # plain load_state_dict
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=0)


def test_a_state_dict_without_schedule_state_keeps_the_current_value():
    """dynconv checkpoints written before the state was saved, and the official layouts, still load strictly."""
    model = dynconv.create_model("resnet18", "odconv_4x", num_classes=5)
    keys = schedule_state_keys(model)
    assert len(keys) == 16
    old = {k: v for k, v in model.state_dict().items() if k not in keys}
    fresh = dynconv.create_model("resnet18", "odconv_4x", num_classes=5)
    dynconv.set_progress(fresh, 0.0)
    fresh.load_state_dict(old, strict=True)
    assert {float(fresh.get_submodule(k.rsplit(".", 1)[0]).temperature) for k in keys} == {30.0}
    assert set(old) == set(model.state_dict()) - keys
