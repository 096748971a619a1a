"""Every per-sample conv path against the slow reference (a loop of ordinary convs), outputs and
gradients, and the path rule of :func:`dynconv.ops.functional.choose_path`."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynconv.ops.functional import PATHS, choose_path, per_sample_conv2d
from dynconv.ops.kernels import Kernels


def reference(x, weight, bias, stride, padding, dilation, groups, tap_scale):
    """Sample by sample: its own kernel (times its tap factors), one ordinary conv each."""
    outs = []
    for b in range(x.shape[0]):
        w = weight[b] if weight.dim() == 5 else weight
        if tap_scale is not None:
            w = w * tap_scale[b].reshape(1, 1, *w.shape[-2:])
        y = F.conv2d(x[b:b + 1], w, None, stride, padding, dilation, groups)
        if bias is not None:
            y = y + (bias[b] if bias.dim() == 2 else bias).reshape(1, -1, 1, 1)
        outs.append(y)
    return torch.cat(outs)


CASES = {  # (C_in, C_out, size, kernel, stride, padding, dilation, groups)
    "3x3": (6, 8, (9, 7), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "3x3 stride 2": (6, 4, (10, 9), (3, 3), (2, 2), (1, 1), (1, 1), 1),
    "1x1": (6, 5, (5, 6), (1, 1), (1, 1), (0, 0), (1, 1), 1),
    "1x1 stride 2": (6, 5, (7, 6), (1, 1), (2, 2), (0, 0), (1, 1), 1),
    "5x3 dilated": (4, 6, (13, 12), (5, 3), (1, 2), (2, 0), (2, 3), 1),
    "grouped": (6, 4, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1), 2),
    "depthwise": (6, 6, (8, 7), (3, 3), (2, 2), (1, 1), (1, 1), 6),
    "'same' padding": (6, 8, (9, 7), (3, 3), (1, 1), "same", (2, 2), 1),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["per-sample", "shared + taps", "per-sample + taps + bias", "shared + shared bias",
                                  "one sample + bias"])
def test_every_path_equals_the_reference_with_gradients(path, case, kind):
    c_in, c_out, size, kernel, stride, padding, dilation, groups = CASES[case]
    torch.manual_seed(0)
    batch = 1 if kind.startswith("one sample") else 3
    opts = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(batch, c_in, *size, **opts)
    shape = (c_out, c_in // groups, *kernel)
    weight = torch.randn(shape if kind.startswith("shared") else (batch, *shape), **opts)
    taps = torch.rand(batch, kernel[0] * kernel[1], **opts) if "taps" in kind else None
    bias = torch.randn(*(() if "shared bias" in kind else (batch,)), c_out, **opts) if "bias" in kind else None
    args = (stride, padding, dilation, groups)
    got = per_sample_conv2d(x, Kernels(weight, spatial=taps), bias, *args, path=path)
    expected = reference(x, weight, bias, *args, taps)
    torch.testing.assert_close(got, expected)
    leaves = [t for t in (x, weight, taps, bias) if t is not None]
    upstream = torch.randn_like(expected)
    for g, e in zip(torch.autograd.grad(got, leaves, upstream), torch.autograd.grad(expected, leaves, upstream)):
        torch.testing.assert_close(g, e)


def test_the_rule_picks_each_path_where_it_measured_fastest():
    w3, w1 = torch.empty(2, 64, 64, 3, 3), torch.empty(2, 256, 64, 1, 1)
    big, small = torch.empty(2, 64, 56, 56), torch.empty(2, 64, 7, 7)
    assert choose_path(big[:1], w3, (1, 1), (1, 1), 1) == "plain"  # one sample: an ordinary conv
    assert choose_path(big, w3, (1, 1), (1, 1), 1) == "grouped"  # 56x56: oneDNN's grouped conv
    assert choose_path(small, w3, (1, 1), (1, 1), 1) == "matmul"  # 7x7: the matmul
    assert choose_path(big, w3, (2, 2), (1, 1), 1) == "grouped"  # 28x28 out
    assert choose_path(torch.empty(2, 64, 28, 28), w3, (2, 2), (1, 1), 1) == "matmul"  # 14x14 out
    assert choose_path(big, w1, (1, 1), (0, 0), 1) == "matmul"  # 1x1 at any size
    depthwise = torch.empty(2, 64, 1, 3, 3)
    assert choose_path(small, depthwise, (1, 1), (1, 1), 64) == "grouped"
    assert choose_path(small, w3, (1, 1), "same", 1) == "grouped"  # string padding: conv only


def test_an_unknown_path_is_named():
    with pytest.raises(ValueError, match="fused"):
        per_sample_conv2d(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 3, 1, 1), path="fused")


@pytest.mark.parametrize("path", ["grouped", "matmul", "plain"])
@pytest.mark.parametrize("taps", [False, True])
@pytest.mark.parametrize("channels", [False, True])
def test_kernels_rebuilt_in_the_backward_give_the_same_gradients(path, taps, channels):
    """With ``rebuild`` the per-sample kernels (and with ``in_scale`` the scaled input) are not kept for
    the backward: the recipe runs there (counted), and every gradient equals the one from kept tensors."""
    from dynconv.ops.functional import mix_kernels

    torch.manual_seed(0)
    opts = dict(dtype=torch.float64, requires_grad=True)
    x, bank = torch.randn(3, 4, 9, 8, **opts), torch.randn(5, 6, 4, 3, 3, **opts)
    coeffs = torch.randn(3, 5, **opts)
    scale = torch.rand(3, 9, **opts) if taps else None
    in_scale = torch.rand(3, 4, **opts) if channels else None
    calls = []

    def rebuild():
        calls.append(1)
        return mix_kernels(coeffs, bank)

    leaves = [t for t in (x, bank, coeffs, scale, in_scale) if t is not None]
    upstream = torch.randn(3, 6, 9, 8, dtype=torch.float64)
    scaled = x * in_scale[:, :, None, None] if channels else x
    kept = per_sample_conv2d(scaled, Kernels(mix_kernels(coeffs, bank), spatial=scale), None, (1, 1), (1, 1),
                             (1, 1), path=path)
    rebuilt = per_sample_conv2d(x, Kernels(mix_kernels(coeffs, bank), spatial=scale, rebuild=rebuild,
                                           in_channel=in_scale), None, (1, 1), (1, 1), (1, 1), path=path)
    torch.testing.assert_close(rebuilt, kept)
    expected = torch.autograd.grad(kept, leaves, upstream)
    assert not calls
    for got, want in zip(torch.autograd.grad(rebuilt, leaves, upstream), expected):
        torch.testing.assert_close(got, want)
    assert calls  # the backward rebuilt the kernels instead of reading kept ones


@pytest.mark.parametrize("path", ["grouped", "matmul"])
def test_kernels_rebuilt_under_autocast_match_kept_ones(path):
    """bf16 autocast on CPU: the backward replays the forward's autocast, so the rebuilt kernels are the
    bf16 kernels the forward used and the gradients are those of kept kernels."""
    from dynconv.ops.functional import mix_kernels

    torch.manual_seed(0)
    x, bank = torch.randn(4, 8, 6, 6, requires_grad=True), torch.randn(4, 8, 8, 3, 3, requires_grad=True)
    coeffs = torch.softmax(torch.randn(4, 4), 1).requires_grad_()
    grads = []
    for rebuild in (None, lambda: mix_kernels(coeffs, bank)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = per_sample_conv2d(x, Kernels(mix_kernels(coeffs, bank), rebuild=rebuild), None, (1, 1), (1, 1),
                                  (1, 1), path=path)
        assert y.dtype == torch.bfloat16
        grads.append(torch.autograd.grad(y.float().square().sum(), (x, bank, coeffs)))
    for kept, rebuilt in zip(*grads):
        torch.testing.assert_close(rebuilt, kept, rtol=0, atol=0)


def test_a_forced_path_wins_inside_its_block_only():
    from dynconv.ops.functional import forced_path

    big, w3 = torch.empty(2, 64, 56, 56), torch.empty(2, 64, 64, 3, 3)
    with forced_path("matmul"):
        assert choose_path(big, w3, (1, 1), (1, 1), 1) == "matmul"
    assert choose_path(big, w3, (1, 1), (1, 1), 1) == "grouped"
    with pytest.raises(ValueError, match="fused"), forced_path("fused"):
        pass


@pytest.mark.parametrize("autocast", [False, True])
def test_per_sample_matmul_gradients_equal_autograds(autocast):
    """The matmul path's own backward ((grad^T @ kernels)^T) against autograd's backward of torch.matmul."""
    from dynconv.ops._matmul import _PerSampleMatmul

    torch.manual_seed(0)
    kernels, cols = torch.randn(3, 2, 5, 18, requires_grad=True), torch.randn(3, 2, 18, 7, requires_grad=True)
    grad = torch.randn(3, 2, 5, 7)
    results = []
    for matmul in (_PerSampleMatmul.apply, torch.matmul):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = matmul(kernels, cols)
        results.append((out, *torch.autograd.grad(out, (kernels, cols), grad.to(out.dtype))))
    tolerance = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=0, atol=0)
    for ours, reference in zip(*results):
        assert ours.dtype == reference.dtype
        torch.testing.assert_close(ours.float(), reference.float(), **tolerance)


@pytest.mark.parametrize("blocks", [(1, 1), (2, 1), (2, 3)])
@pytest.mark.parametrize("case", ["3x3", "3x3 stride 2", "5x3 dilated"])
@pytest.mark.parametrize("rebuilt", [False, True])
def test_cell_conv_equals_the_reference_with_assembled_kernels(blocks, case, rebuilt):
    """KernelWarehouse's cells contracted tap by tap (cell_conv2d) against the loop of ordinary convs with
    the kernels assembled from the cells: output block o, input block i at tap s is mixture (s*O+o)*I+i."""
    from dynconv.ops.functional import cell_conv2d

    c_in, c_out, size, kernel, stride, padding, dilation, _ = CASES[case]
    (n_out, n_in), taps = blocks, kernel[0] * kernel[1]
    c_in, c_out = 2 * n_in, 3 * n_out  # cells of 3 x 2
    torch.manual_seed(0)
    x = torch.randn(3, c_in, *size, dtype=torch.float64, requires_grad=True)
    source = torch.randn(taps * n_out * n_in, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    cells = source * 1.0  # a non-leaf, as the mixed cells are
    out = cell_conv2d(x, cells, blocks, kernel, stride, padding, dilation,
                      rebuild=(lambda: source * 1.0) if rebuilt else None)
    kernels = (source.reshape(*kernel, n_out, n_in, 3, 3, 2)  # (kh, kw, O, I, B, cell_out, cell_in)
               .permute(4, 2, 5, 3, 6, 0, 1).reshape(3, c_out, c_in, *kernel))
    expected = reference(x, kernels, None, stride, padding, dilation, 1, None)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (x, source), grad),
                               torch.autograd.grad(expected, (x, source), grad))
