"""Slow, obviously correct forward passes of the OFFICIAL models, straight from official state dicts.

Written from the descriptions of OSVAI/ODConv (``models/od_resnet.py``, ``models/od_mobilenetv2.py``,
``modules/odconv.py``) and OSVAI/KernelWarehouse (``models/kw_resnet.py``, ``models/kw_mobilenetv2.py``,
``modules/kernel_warehouse.py``), liyunsheng13/dcd (``models/imagenet/resnet_dcd.py``) and
zhuogege1943/dgc (``layers.py``, ``models/dynamic_resnet.py``); nothing here
imports dynconv. Every dynamic layer builds each sample's kernel explicitly and convolves each
sample alone (DCD: its decomposition is evaluated per sample). Evaluation mode: BatchNorm with running statistics, ODConv temperature 1,
KernelWarehouse tau 0 (so ``alpha = z / (sum |z| + 1e-3)``, and beta plays no part).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

State = Dict[str, torch.Tensor]
EPS = 1e-5

# torchvision / official MobileNetV2 inverted-residual setting (t, c, n, s) at width 1.0.
MBV2_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def batch_norm(state: State, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm over dim 1 of ``x`` (2-D or 4-D)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean, var = state[f"{prefix}.running_mean"].reshape(shape), state[f"{prefix}.running_var"].reshape(shape)
    weight, bias = state[f"{prefix}.weight"].reshape(shape), state[f"{prefix}.bias"].reshape(shape)
    return (x - mean) / torch.sqrt(var + EPS) * weight + bias


def linear(weight: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``weight @ v`` for a Linear weight or a 1x1 conv weight, on one vector ``v``."""
    out = weight.reshape(weight.shape[0], -1) @ v
    return out if bias is None else out + bias


def convolve_each(x: torch.Tensor, kernels: List[torch.Tensor], stride: int, padding: int, groups: int,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.cat([F.conv2d(x[b:b + 1], kernels[b], bias, stride, padding, 1, groups) for b in range(len(kernels))])


def input_channel_grid(c_out: int, c_in_per_group: int, groups: int) -> torch.Tensor:
    """``grid[o, j]``: the input channel that kernel entry (o, j) reads in a grouped conv."""
    out_per_group = c_out // groups
    o = torch.arange(c_out).unsqueeze(1)
    return (o // out_per_group) * c_in_per_group + torch.arange(c_in_per_group).unsqueeze(0)


def odconv(state: State, prefix: str, x: torch.Tensor, stride: int, padding: int, groups: int) -> torch.Tensor:
    """ODConv2d: W_b = sum_i a_w[i] * a_s * a_f[o] * a_c[c] * W_i (ODConv paper Eq. 1; OSVAI/ODConv modules/odconv.py), no bias."""
    weights = state[f"{prefix}.weight"]  # (n, C_out, C_in / g, k, k)
    n, c_out, c_in_g, k, _ = weights.shape
    att = f"{prefix}.attention"
    grid = input_channel_grid(c_out, c_in_g, groups)
    kernels = []
    for b in range(x.shape[0]):
        h = linear(state[f"{att}.fc.weight"], x[b].mean((1, 2)))
        h = torch.relu(batch_norm(state, f"{att}.bn", h.unsqueeze(0))[0])

        def head(name: str) -> Optional[torch.Tensor]:
            if f"{att}.{name}.weight" not in state:
                return None
            return linear(state[f"{att}.{name}.weight"], h, state[f"{att}.{name}.bias"])

        a_c = torch.sigmoid(head("channel_fc"))
        a_f = torch.sigmoid(head("filter_fc")) if head("filter_fc") is not None else torch.ones(c_out, dtype=x.dtype)
        spatial = head("spatial_fc")
        a_s = torch.sigmoid(spatial).reshape(k, k) if spatial is not None else torch.ones(k, k, dtype=x.dtype)
        kernel_logits = head("kernel_fc")
        a_w = torch.softmax(kernel_logits, 0) if kernel_logits is not None else torch.ones(1, dtype=x.dtype)
        assert a_w.numel() == n
        scale = a_f[:, None] * a_c[grid]  # (C_out, C_in / g)
        kernel = sum(a_w[i] * weights[i] * scale[:, :, None, None] * a_s for i in range(n))
        kernels.append(kernel)
    return convolve_each(x, kernels, stride, padding, groups, None)


def find_warehouse(banks: List[torch.Tensor], rows: int, c_out: int, c_in_g: int, k: int) -> torch.Tensor:
    """The one warehouse whose cells tile the kernel and whose size ``n`` explains fc2's ``(n + 1) * m``
    rows (which warehouse a layer uses is not stored in an official state dict)."""
    fits = []
    for bank in banks:
        cell_out, cell_in = bank.shape[1], bank.shape[2]
        if c_out % cell_out or c_in_g % cell_in:
            continue
        mixtures = (c_out // cell_out) * (c_in_g // cell_in) * k * k
        if rows == (bank.shape[0] + 1) * mixtures:
            fits.append(bank)
    assert len(fits) == 1, f"{len(fits)} warehouses fit a {c_out}x{c_in_g}x{k}x{k} kernel with {rows} logits"
    return fits[0]


def kw_kernel(cells: torch.Tensor, c_out: int, c_in_g: int, k: int) -> torch.Tensor:
    """Place mixture ``j = s * (G_out * G_in) + o * G_in + i`` at output block o, input block i, tap s (OSVAI/KernelWarehouse modules/kernel_warehouse.py, ``KWconvNd``)."""
    cell_out, cell_in = cells.shape[1], cells.shape[2]
    g_out, g_in = c_out // cell_out, c_in_g // cell_in
    kernel = cells.new_zeros(c_out, c_in_g, k, k)
    for j in range(cells.shape[0]):
        s, o, i = j // (g_out * g_in), (j // g_in) % g_out, j % g_in
        kernel[o * cell_out:(o + 1) * cell_out, i * cell_in:(i + 1) * cell_in, s // k, s % k] = cells[j]
    return kernel


def kw_conv(state: State, banks: List[torch.Tensor], prefix: str, x: torch.Tensor, c_out: int, k: int,
            stride: int, padding: int, groups: int) -> torch.Tensor:
    """KWConv2d at tau = 0: each mixture is ``sum_t alpha[j, t] e_t`` over its whole warehouse (KernelWarehouse paper Sec. 3; modules/kernel_warehouse.py)."""
    att = f"{prefix}.attention"
    c_in_g = x.shape[1] // groups
    bank = find_warehouse(banks, state[f"{att}.fc2.weight"].shape[0], c_out, c_in_g, k)
    n = bank.shape[0]
    kernels = []
    for b in range(x.shape[0]):
        h = linear(state[f"{att}.fc1.weight"], x[b].mean((1, 2)), state.get(f"{att}.fc1.bias"))
        h = torch.relu(batch_norm(state, f"{att}.norm1", h.unsqueeze(0))[0])
        z = linear(state[f"{att}.fc2.weight"], h, state[f"{att}.fc2.bias"]).reshape(-1, n + 1)
        alpha = (z / (z.abs().sum(1, keepdim=True) + 1e-3))[:, :n]
        cells = torch.einsum("jt,tab->jab", alpha, bank.reshape(n, bank.shape[1], bank.shape[2]))
        kernels.append(kw_kernel(cells, c_out, c_in_g, k))
    return convolve_each(x, kernels, stride, padding, groups, state.get(f"{prefix}.bias"))


def hsigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(v + 3, 0, 6) / 3


def dcd_attention(state: State, prefix: str, v: torch.Tensor):
    """DCD's ``fc`` (Linear, then ``y * hsigmoid(W y)``), ``fc_phi`` and ``hsigmoid(fc_scale)`` (liyunsheng13/dcd models/imagenet/resnet_dcd.py)."""
    y = linear(state[f"{prefix}.fc.0.weight"], v)
    y = y * hsigmoid(linear(state[f"{prefix}.fc.1.fc.0.weight"], y))
    latent = int(state[f"{prefix}.fc_phi.weight"].shape[0] ** 0.5)
    return linear(state[f"{prefix}.fc_phi.weight"], y).reshape(latent, latent), hsigmoid(linear(state[f"{prefix}.fc_scale.weight"], y))


def dcd_conv(state: State, prefix: str, x: torch.Tensor, stride: int, padding: int, pool: int) -> torch.Tensor:
    """conv_dy / conv_basic_dy, one sample at a time: Lambda * conv_W0(x) + P(BN1d(Phi z) + z), z = BN2d(Q x)."""
    outs = []
    for b in range(x.shape[0]):
        xb = x[b:b + 1]
        phi, lam = dcd_attention(state, prefix, F.adaptive_avg_pool2d(xb, pool).reshape(-1))
        main = F.conv2d(xb, state[f"{prefix}.conv.weight"], None, stride, padding) * lam[None, :, None, None]
        z = batch_norm(state, f"{prefix}.bn1", F.conv2d(xb, state[f"{prefix}.q.weight"], None, stride))
        flat = z.flatten(2)
        mixed = batch_norm(state, f"{prefix}.bn2", phi @ flat) + flat
        outs.append(main + F.conv2d(mixed.reshape(z.shape), state[f"{prefix}.p.weight"]))
    return torch.cat(outs)


def dcd_classifier(state: State, prefix: str, pooled: torch.Tensor) -> torch.Tensor:
    """DYCls: hsigmoid(fc_scale) * cls(x) + cls_p(BN(Phi z) + z), z = BN(cls_q x)."""
    rows = []
    for v in pooled:
        phi, lam = dcd_attention(state, prefix, v)
        z = batch_norm(state, f"{prefix}.bn1", (state[f"{prefix}.cls_q.weight"] @ v).unsqueeze(0))[0]
        mixed = batch_norm(state, f"{prefix}.bn2", (phi @ z).unsqueeze(0))[0] + z
        rows.append(lam * linear(state[f"{prefix}.cls.weight"], v, state[f"{prefix}.cls.bias"])
                    + state[f"{prefix}.cls_p.weight"] @ mixed)
    return torch.stack(rows)


def dgc_conv(state: State, prefix: str, x: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """DynamicMultiHeadConv at eval, one sample and head at a time (zhuogege1943/dgc layers.py): ``ReLU(BN(x))``; per head the
    saliency ``ReLU(fc2(ReLU(fc1(GAP))))`` with its ``_inactive_channels`` smallest entries (and ties)
    zeroed; the head's conv of ``x * g``; channel ``j`` of head ``h`` lands at ``j * heads + h``."""
    x = torch.relu(batch_norm(state, f"{prefix}.norm", x))
    inactive = int(state[f"{prefix}._inactive_channels"][0])
    heads = sum(1 for key in state if key.startswith(f"{prefix}.headconv_") and key.endswith(".conv.weight"))
    outs = []
    for b in range(x.shape[0]):
        v = x[b].mean((1, 2))
        per_head = []
        for h in range(heads):
            p = f"{prefix}.headconv_{h}"
            g = torch.relu(linear(state[f"{p}.fc2.weight"], torch.relu(linear(state[f"{p}.fc1.weight"], v)),
                                  state[f"{p}.fc2.bias"]))
            if inactive > 0:
                g = torch.where(g <= torch.sort(g).values[inactive - 1], torch.zeros_like(g), g)
            per_head.append(F.conv2d(x[b:b + 1] * g[:, None, None], state[f"{p}.conv.weight"], None, stride, padding))
        outs.append(torch.stack(per_head, dim=2).flatten(1, 2))
    return torch.cat(outs)


def conv(state: State, prefix: str, x: torch.Tensor, c_out: int, k: int, stride: int = 1, groups: int = 1) -> torch.Tensor:
    """A conv of the official model: ODConv, KW, DCD, DGC or plain, told apart by the keys it left in ``state``."""
    padding = k // 2
    if f"{prefix}.headconv_0.conv.weight" in state:
        return dgc_conv(state, prefix, x, stride, padding)
    if f"{prefix}.q.weight" in state:  # resnet_dcd: BasicBlock convs pool 2x2 (conv_basic_dy)
        pool = 2 if state[f"{prefix}.fc.0.weight"].shape[1] == 4 * x.shape[1] else 1
        return dcd_conv(state, prefix, x, stride, padding, pool)
    if f"{prefix}.attention.fc.weight" in state:
        return odconv(state, prefix, x, stride, padding, groups)
    if f"{prefix}.attention.fc1.weight" in state:
        banks = [v for key, v in state.items() if key.startswith("warehouse_manager.weights.")]
        return kw_conv(state, banks, prefix, x, c_out, k, stride, padding, groups)
    return F.conv2d(x, state[f"{prefix}.weight"], state.get(f"{prefix}.bias"), stride, padding, 1, groups)


def resnet18_forward(state: State, x: torch.Tensor) -> torch.Tensor:
    """OD_ResNet / KW_ResNet / ResNet_dcd / dyresnet18 with BasicBlocks [2, 2, 2, 2]: torchvision's layout."""
    x = torch.relu(batch_norm(state, "bn1", conv(state, "conv1", x, 64, 7, stride=2)))
    x = F.max_pool2d(x, 3, 2, 1)
    for s, planes in enumerate((64, 128, 256, 512)):
        for b in range(2):
            p, stride = f"layer{s + 1}.{b}", 2 if s > 0 and b == 0 else 1
            out = torch.relu(batch_norm(state, f"{p}.bn1", conv(state, f"{p}.conv1", x, planes, 3, stride)))
            out = batch_norm(state, f"{p}.bn2", conv(state, f"{p}.conv2", out, planes, 3))
            for norm in (f"{p}.downsample.1", f"{p}.downsample.1.norm"):  # dyresnet18: Norm_after_downsample
                if f"{norm}.weight" in state:
                    x = batch_norm(state, norm, conv(state, f"{p}.downsample.0", x, planes, 1, stride))
            x = torch.relu(out + x)
    return classify(state, x)


def mobilenetv2_forward(state: State, x: torch.Tensor) -> torch.Tensor:
    """OD_MobileNetV2 / KW_MobileNetV2 at width 1.0: ``features.*`` with ReLU6 (OSVAI/ODConv models/od_mobilenetv2.py, OSVAI/KernelWarehouse models/kw_mobilenetv2.py)."""
    relu6 = F.relu6
    x = relu6(batch_norm(state, "features.0.1", conv(state, "features.0.0", x, 32, 3, stride=2)))
    cin, idx = 32, 1
    for t, c, reps, first_stride in MBV2_SETTING:
        for r in range(reps):
            p, stride, hidden = f"features.{idx}.conv", first_stride if r == 0 else 1, cin * t
            out, j = x, 0
            if t != 1:
                out = relu6(batch_norm(state, f"{p}.0.1", conv(state, f"{p}.0.0", out, hidden, 1)))
                j = 1
            out = relu6(batch_norm(state, f"{p}.{j}.1", conv(state, f"{p}.{j}.0", out, hidden, 3, stride, groups=hidden)))
            out = batch_norm(state, f"{p}.{j + 2}", conv(state, f"{p}.{j + 1}", out, c, 1))
            x = x + out if stride == 1 and cin == c else out
            cin, idx = c, idx + 1
    x = relu6(batch_norm(state, f"features.{idx}.1", conv(state, f"features.{idx}.0", x, 1280, 1)))
    return classify(state, x)


def classify(state: State, x: torch.Tensor) -> torch.Tensor:
    """Global average pool and the Linear head: ``fc`` (ResNet), ``classifier.1`` (ODConv MobileNetV2,
    after a Dropout) or a bare ``classifier`` (kw_mobilenetv2)."""
    pooled = x.mean((2, 3))
    if "classifier.0.cls.weight" in state:
        return dcd_classifier(state, "classifier.0", pooled)
    for name in ("fc", "classifier.1", "classifier"):
        if f"{name}.weight" in state:
            return pooled @ state[f"{name}.weight"].T + state[f"{name}.bias"]
    raise KeyError("no classifier in the state dict")
