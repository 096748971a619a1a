"""Slow, obviously correct references: each sample's kernel is built explicitly and convolved alone.

The attentions are recomputed here from the layers' parameters with plain tensor ops (eval-mode
BatchNorm), so a wrong head, temperature, broadcast or channel order in a layer shows up.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_per_sample(x, kernels, biases, layer):
    """``F.conv2d`` on each sample with its own kernel; ``biases`` may be ``None``."""
    outs = []
    for b in range(x.shape[0]):
        bias = None if biases is None else biases[b]
        outs.append(F.conv2d(x[b : b + 1], kernels[b], bias, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outs)


def _pool(x, b):
    return x[b].mean(dim=(1, 2))


def _conv1x1(conv, v):
    out = conv.weight.flatten(1) @ v
    return out + conv.bias if conv.bias is not None else out


def _bn_eval(bn, v):
    return (v - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def input_channel_of(layer, out_index, in_index_within_group):
    out_per_group = layer.out_channels // layer.groups
    in_per_group = layer.in_channels // layer.groups
    return (out_index // out_per_group) * in_per_group + in_index_within_group


def odconv_reference(layer, x):
    """ODConv (eval mode): W_b = sum_i a_w[i] * a_s * a_f[o] * a_c[c] * W_i, conv per sample."""
    att = layer.attention
    t = att.temperature
    kernels = []
    c_out, c_in_g, kh, kw = layer.weight.shape[1:]
    for b in range(x.shape[0]):
        h = torch.relu(_bn_eval(att.bn, _conv1x1(att.fc, _pool(x, b))))
        a_c = torch.sigmoid(_conv1x1(att.channel_fc, h) / t)
        a_f = torch.sigmoid(_conv1x1(att.filter_fc, h) / t) if att.filter_fc is not None else torch.ones(c_out, dtype=x.dtype)
        a_s = torch.sigmoid(_conv1x1(att.spatial_fc, h) / t).reshape(kh, kw) if att.spatial_fc is not None else torch.ones(kh, kw, dtype=x.dtype)
        a_w = torch.softmax(_conv1x1(att.kernel_fc, h) / t, 0) if att.kernel_fc is not None else torch.ones(1, dtype=x.dtype)
        kernel = torch.zeros(c_out, c_in_g, kh, kw, dtype=x.dtype)
        for i in range(layer.kernel_num):
            for o in range(c_out):
                for j in range(c_in_g):
                    c = input_channel_of(layer, o, j)
                    kernel[o, j] = kernel[o, j] + a_w[i] * a_f[o] * a_c[c] * a_s * layer.weight[i, o, j]
        kernels.append(kernel)
    bias = None if layer.bias is None else layer.bias.expand(x.shape[0], -1)
    return conv_per_sample(x, kernels, bias, layer)


def mixture_reference(layer, x, coefficients):
    """W_b = sum_i coefficients[b, i] W_i (and the same for the bias)."""
    kernels, biases = [], []
    for b in range(x.shape[0]):
        kernels.append(sum(coefficients[b, i] * layer.weight[i] for i in range(layer.weight.shape[0])))
        if layer.bias is not None:
            biases.append(sum(coefficients[b, i] * layer.bias[i] for i in range(layer.bias.shape[0])))
    return conv_per_sample(x, kernels, biases if layer.bias is not None else None, layer)


def dyconv_coefficients(layer, x):
    att = layer.attention
    rows = []
    for b in range(x.shape[0]):
        h = torch.relu(att.fc1.weight @ _pool(x, b))
        rows.append(torch.softmax((att.fc2.weight @ h + att.fc2.bias) / att.temperature, 0))
    return torch.stack(rows)


def condconv_coefficients(layer, x):
    return torch.stack(
        [torch.sigmoid(layer.routing.weight @ _pool(x, b) + layer.routing.bias) for b in range(x.shape[0])]
    )
