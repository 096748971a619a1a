"""The shared functional helpers against torch's own ops."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynconv.ops.functional import conv_patches, per_sample_conv2d


@pytest.mark.parametrize("kernel, stride, padding, dilation, size", [
    ((3, 3), (1, 1), (1, 1), (1, 1), (7, 9)),
    ((3, 3), (2, 2), (1, 1), (1, 1), (9, 8)),
    ((1, 1), (2, 2), (0, 0), (1, 1), (7, 7)),
    ((5, 3), (1, 2), (2, 0), (2, 3), (13, 12)),
])
def test_conv_patches_flatten_to_unfold(kernel, stride, padding, dilation, size):
    x = torch.randn(2, 3, *size)
    patches = conv_patches(x, kernel, stride, padding, dilation)
    cols = F.unfold(x, kernel, dilation, padding, stride)
    assert patches.shape[:4] == (2, 3, *kernel)
    torch.testing.assert_close(patches.reshape(2, cols.shape[1], -1), cols, rtol=0, atol=0)


def test_per_sample_conv2d_is_a_loop_of_convs():
    x, w = torch.randn(3, 4, 6, 5), torch.randn(3, 6, 2, 3, 3)
    got = per_sample_conv2d(x, w, None, (1, 1), (1, 1), (1, 1), groups=2)
    expected = torch.cat([F.conv2d(x[b:b + 1], w[b], None, 1, 1, 1, 2) for b in range(3)])
    torch.testing.assert_close(got, expected)
