"""``deploy``: an inference copy of a model with every foldable BatchNorm folded into the layer before it.

A BatchNorm in eval mode is the per-channel affine map ``y -> s * y + t`` with ``s = gamma / sqrt(var + eps)``
and ``t = beta - s * mean`` (Ioffe & Szegedy, arXiv:1502.03167, Algorithm 2). Every dynconv layer is linear in
its kernels and adds at most a static bias last, so ``s`` goes into the kernels (every CondConv / DY-Conv
expert, ODConv kernel, DCD's ``W0`` and ``P``, DGC head, IC-Conv member: the mixture of scaled kernels is the
scaled mixture) and ``t`` into that last bias, after any attention that scales the output (ODConv's filter
attention multiplies the conv before the BatchNorm, so the shift must not be multiplied by it).
KernelWarehouse cells are shared by layers with different BatchNorms, so a KW layer keeps its scale as a
per-channel factor of its assembled kernels or of its output, whichever is smaller
(:class:`DeployedKWConv2d`). FDConv keeps its kernel as a spectrum, which a per-channel scale does not
commute with; its scale multiplies the filter attention on the output (:class:`DeployedFDConv2d`).

Which BatchNorm follows which layer is read from one traced forward pass: a BatchNorm is folded when its
input is the output of a layer ``deploy`` knows (plain ``nn.Conv2d`` / ``nn.Linear`` or a dynconv layer),
that layer ran once, and nothing else reads its output. That also folds the BatchNorms inside the attention
branches (ODConv's, KernelWarehouse's, DCD's ``Q``-path) and DGC's internal pre-activation BatchNorm where
the layer before it is a plain conv; DCD's latent BatchNorm (``bn2``) is folded through ``P``.

Not folded (no exact fold exists): BatchNorms after a ReLU or a residual sum (DGC's pre-activation on
ResNet), LayerNorms (ConvNeXt, KernelWarehouse's ConvNeXt attention), BatchNorms that still normalise with
batch statistics (an untrained DCD / DGC model), ODConv's channel and filter attentions (input-dependent
scalings of the input and output; they stay elementwise multiplies). Input-independent work is done once:
the ODConv, DY-Conv and KernelWarehouse attentions take an inference form with their BatchNorm and
temperature folded into their matrices (:mod:`dynconv.fused_attention`), and a warm-up forward builds DGC's weight layout and IC-Conv's packed
kernels, which the frozen parameters keep cached.

The deployed model is for inference only: it is in eval mode, its parameters do not require gradients,
and training it is not supported (the layers' training-time BatchNorm behaviour is gone).
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_tracing

from .fused_attention import fuse_attentions
from .fresh_statistics import FRESH_ATTR, _fresh_norm_hook
from .ops._base import DynamicConv2dBase
from .ops.condconv import CondConv2d
from .ops.dcd import DCDConv2d, DCDLinear
from .ops.dgc import DGCConv2d
from .ops.dyconv import DynamicConv2d
from .ops.fdconv import FDConv2d
from .ops.functional import cell_conv2d, per_sample_conv2d
from .ops.icconv import InceptionConv2d
from .ops.kernelwarehouse import KWConv2d, _KWTokenConv
from .ops.odconv import ODConv2d

__all__ = ["DeployedCondConv2d", "DeployedFDConv2d", "DeployedKWConv2d", "bn_affine", "deploy", "find_folds"]

_BN = nn.modules.batchnorm._BatchNorm


def bn_affine(bn: _BN) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` of an eval-mode BatchNorm: ``bn(y) = scale * y + shift`` per channel (computed in at
    least float32, so that a half-precision model's fold rounds once, when stored)."""
    dtype = torch.promote_types(bn.running_var.dtype, torch.float32)
    scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype)
    shift = -bn.running_mean.to(dtype) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dtype)
    return scale, shift


def _channel_view(v: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return v.reshape(shape)


def _set_bias(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    """Sets ``owner.<name>`` to ``value``, as a parameter (a layer built with ``bias=False`` gets one)."""
    current = getattr(owner, name, None)
    if isinstance(current, nn.Parameter):
        current.copy_(value)
    else:
        if name in owner._parameters or current is None:
            owner._parameters.pop(name, None)
            if hasattr(owner, name):
                delattr(owner, name)
        owner.register_parameter(name, nn.Parameter(value.detach().clone()))


def _affine_bias(bias: Optional[torch.Tensor], scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return shift if bias is None else bias * scale + shift


# -- one fold per layer type: ``fold(layer, scale, shift)`` makes ``layer(x)`` return ``scale * layer(x) + shift``
# (per output channel) and returns the module to put in its place.


def _fold_dense(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    """``nn.Conv2d`` / ``nn.Linear`` (output channels on dim 0 of the weight)."""
    layer.weight.mul_(_channel_view(scale, 0, layer.weight.dim()))
    _set_bias(layer, "bias", _affine_bias(layer.bias, scale, shift))
    return layer


def _fold_condconv(layer: CondConv2d, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    # sigmoid routing weights need not sum to one: the shift cannot ride on the expert biases
    layer.weight.mul_(_channel_view(scale, 1, layer.weight.dim()))
    if layer.bias is not None:
        layer.bias.mul_(scale)
    DeployedCondConv2d.adopt(layer, shift)
    return layer


def _fold_dyconv(layer: DynamicConv2d, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    # softmax attention sums to one, so a shift added to every kernel's bias is added once
    layer.weight.mul_(_channel_view(scale, 1, layer.weight.dim()))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(layer.weight[:, :, 0, 0, 0])
    _set_bias(layer, "bias", bias * scale + shift)
    return layer


def _fold_odconv(layer: ODConv2d, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    # the filter attention a_f multiplies the conv output per channel, so it commutes with the scale;
    # the shift goes into the static bias added after a_f
    layer.weight.mul_(_channel_view(scale, 1, layer.weight.dim()))
    _set_bias(layer, "bias", _affine_bias(layer.bias, scale, shift))
    return layer


def _fold_dcd(layer: DCDConv2d, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    # out = Lambda * conv_W0(x) + P(...) + bias: scale W0 and P, shift the static bias
    layer.conv.weight.mul_(_channel_view(scale, 0, 4))
    layer.p.weight.mul_(_channel_view(scale, 0, 4))
    if layer.p.bias is not None:
        layer.p.bias.mul_(scale)
    _set_bias(layer, "bias", _affine_bias(layer.bias, scale, shift))
    return layer


def _fold_dgc(layer: DGCConv2d, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    # head h computes output channels j * heads + h (interleaved)
    per_head = scale.reshape(-1, layer.heads)
    for h, head in enumerate(layer.head_modules()):
        head.conv.weight.mul_(_channel_view(per_head[:, h], 0, 4))
    _set_bias(layer, "bias", _affine_bias(layer.bias, scale, shift))
    layer._weight_cache = None  # (keyed on the weights' versions, which the in-place scaling bumps anyway)
    return layer


def _fold_icconv(layer: InceptionConv2d, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    for conv, member in zip(layer.conv_list, layer.members):
        conv.weight.mul_(_channel_view(scale[member.start:member.stop], 0, 4))
    layer._packed.clear()  # packed kernels are rebuilt from the scaled members
    _set_bias(layer, "bias", _affine_bias(layer.bias, scale, shift))
    return layer


def _fold_kw(layer: KWConv2d, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    # The warehouse cells are shared by several layers, each with its own BatchNorm: the scale cannot go
    # into the shared cells (per-layer scaled copies of the warehouse, one per output block, would take 4x
    # (ResNet18 KW 1x) to 24x (ResNet50 KW 1x) the model's parameters). See DeployedKWConv2d.
    DeployedKWConv2d.adopt(layer, scale)
    _set_bias(layer, "bias", _affine_bias(layer.bias, scale, shift))
    return layer


def _fold_fdconv(layer: FDConv2d, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    # FDW holds the kernel as the spectrum of its C_out k x C_in k matrix: a per-output-channel scale of the
    # kernel scales rows of that matrix, which mixes the spectral bins across the frequency groups (no
    # scaled dft_weight gives it), and the local KSM factors are sigmoids. The scale rides on the filter
    # attention instead, which already multiplies the output per channel (no extra work); the shift goes
    # into the static bias added after it.
    DeployedFDConv2d.adopt(layer, scale)
    _set_bias(layer, "bias", _affine_bias(layer.bias, scale, shift))
    return layer


class DeployedFDConv2d(FDConv2d):
    """An :class:`~dynconv.ops.fdconv.FDConv2d` with a folded BatchNorm scale ``out_scale`` per output channel,
    multiplied into the filter attention, and the shift in its static bias."""

    out_scale: torch.Tensor

    @classmethod
    def adopt(cls, layer: FDConv2d, scale: torch.Tensor) -> None:
        if not isinstance(layer, cls):
            layer.__class__ = cls  # a subclass swap: the layer keeps its spectrum, attentions and buffers
            layer.register_buffer("out_scale", torch.ones_like(scale))
        layer.out_scale.mul_(scale)

    def output_scale(self, a_f: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        scale = self.out_scale.reshape(1, -1)
        return scale if a_f is None else a_f * scale


class DeployedCondConv2d(CondConv2d):
    """A :class:`~dynconv.ops.condconv.CondConv2d` with a folded BatchNorm's shift added to its mixed bias, which
    the convolution adds (its sigmoid routing need not sum to one, so the shift cannot go into the experts')."""

    shift: torch.Tensor

    @classmethod
    def adopt(cls, layer: CondConv2d, shift: torch.Tensor) -> None:
        if not isinstance(layer, cls):
            layer.__class__ = cls  # a subclass swap: the layer keeps its routing and experts
            layer.register_buffer("shift", torch.zeros_like(shift))
        layer.shift.add_(shift)

    def mixed_bias(self, routing: torch.Tensor) -> torch.Tensor:
        bias = super().mixed_bias(routing)
        return self.shift if bias is None else bias + self.shift


class DeployedKWConv2d(KWConv2d):
    """A :class:`~dynconv.ops.kernelwarehouse.KWConv2d` with a folded BatchNorm scale ``out_scale`` per output
    channel (the shared warehouse cells stay untouched) and the shift in its static bias.

    The scale multiplies whichever is smaller per sample: the assembled kernels (``C_out * C_in / g * k^2``,
    large output maps) or the output (``C_out * H' * W'``, small maps, where the per-sample kernels
    outweigh the activations: scaling them cost 20% of KW ResNet18's CPU time at 224 px, more than the
    BatchNorms it replaces).
    """

    out_scale: torch.Tensor

    @classmethod
    def adopt(cls, layer: KWConv2d, scale: torch.Tensor) -> None:
        if not isinstance(layer, cls):
            # a subclass swap rather than a rebuild: the layer keeps its attention, cell slice and manager
            layer.__class__ = _DEPLOYED_KW.get(type(layer), cls)
            layer.register_buffer("out_scale", torch.ones_like(scale))
        layer.out_scale.mul_(scale)

    def kernel(self, attention: torch.Tensor) -> torch.Tensor:
        return super().kernel(attention) * self.out_scale.reshape(1, -1, 1, 1, 1)

    def mixture_cells(self, attention: torch.Tensor) -> torch.Tensor:
        cells = super().mixture_cells(attention)  # (m, B, c_out, c_in), mixture j = (s * O + o) * I + i
        by_block = self.out_scale.reshape(self.blocks_out, 1, -1)  # (O, 1, c_out)
        per_mixture = by_block.unsqueeze(0).expand(self.blocks_spatial, -1, self.blocks_in, -1)
        return cells * per_mixture.reshape(self.num_mixtures, 1, -1, 1)

    def _scales_kernels(self, x: torch.Tensor) -> bool:
        pixels = 1
        for axis in (0, 1):
            size, k, s, d = x.shape[2 + axis], self.kernel_size[axis], self.stride[axis], self.dilation[axis]
            pad = self.padding[axis] if not isinstance(self.padding, str) else (d * (k - 1) // 2 if self.padding
                                                                                 == "same" else 0)
            pixels *= (size + 2 * pad - d * (k - 1) - 1) // s + 1
        return pixels >= self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        contracts = not is_fx_tracing() and self._contracts_cells(x)
        on_kernels = self._scales_kernels(x)
        if is_fx_tracing() or (on_kernels and not contracts and self._one_sample(x)):
            return super().forward(x)  # through kernel() (one sample: _forward_one): scaled kernels
        attention = self.attention(x)
        if on_kernels and not contracts:  # the scaled kernels, assembled (an inference model: none kept for a backward)
            return per_sample_conv2d(x, self.kernel(attention), self.bias, **self._conv_kwargs())
        if contracts:
            # explicit cells: KWConv2d's own cell path takes (rows, bank), which cannot carry a per-channel scale
            cells = self.mixture_cells(attention) if on_kernels else KWConv2d.mixture_cells(self, attention)
            out = cell_conv2d(x, cells, (self.blocks_out, self.blocks_in), self.kernel_size, self.stride,
                              self.padding, self.dilation)
        else:
            out = per_sample_conv2d(x, KWConv2d.kernel(self, attention), None, **self._conv_kwargs())
        bias = self.bias.reshape(1, -1, 1, 1) if self.bias is not None else None
        if on_kernels:
            return out + bias if bias is not None else out
        scale = self.out_scale.reshape(1, -1, 1, 1)
        return torch.addcmul(bias, out, scale) if bias is not None else out * scale


class _DeployedKWTokenConv(DeployedKWConv2d, _KWTokenConv):
    """The deployed form of a KernelWarehouse linear layer's token conv (both bases' behaviour, nothing added)."""


_DEPLOYED_KW = {KWConv2d: DeployedKWConv2d, _KWTokenConv: _DeployedKWTokenConv}

Fold = Callable[[nn.Module, torch.Tensor, torch.Tensor], nn.Module]
# exact types for torch's layers (a subclass may change forward, e.g. weight standardisation)
_EXACT: Dict[type, Fold] = {nn.Conv2d: _fold_dense, nn.Linear: _fold_dense}
_FAMILY: Dict[type, Fold] = {
    CondConv2d: _fold_condconv,
    DynamicConv2d: _fold_dyconv,
    ODConv2d: _fold_odconv,
    DCDConv2d: _fold_dcd,
    DGCConv2d: _fold_dgc,
    InceptionConv2d: _fold_icconv,
    KWConv2d: _fold_kw,
    FDConv2d: _fold_fdconv,
}


def _folder(module: nn.Module) -> Optional[Fold]:
    if type(module) in _EXACT:
        return _EXACT[type(module)]
    for cls in type(module).__mro__:
        if cls in _FAMILY:
            return _FAMILY[cls]
    return None


# -- input-independent precomputation, per layer type, before the folds


def _fold_dcd_latent_norm(owner: nn.Module, phi_fc: nn.Linear, bn2: _BN, p: nn.Module, dim: int) -> None:
    """DCD's ``bn2(Phi @ z)``: the scale goes into the rows of ``Phi`` (``fc_phi``), the shift, a constant
    latent vector, through ``P`` into a static bias of ``P``."""
    scale, shift = (v.to(phi_fc.weight.dtype) for v in bn_affine(bn2))
    weight = phi_fc.weight.view(dim, dim, -1)  # Phi[b] = fc_phi(y).view(L, L): row i is outputs i*L..
    weight.mul_(scale.view(dim, 1, 1))
    if phi_fc.bias is not None:
        phi_fc.bias.view(dim, dim).mul_(scale.view(dim, 1))
    p_matrix = p.weight.reshape(p.weight.shape[0], dim)
    _set_bias(p, "bias", _affine_bias(p.bias, torch.ones_like(p_matrix[:, 0]), p_matrix @ shift))
    setattr(owner, "bn2", nn.Identity())


def _precompute(model: nn.Module) -> List[str]:
    done = []
    for name, m in model.named_modules():
        if isinstance(m, DCDConv2d) and isinstance(m.bn2, _BN):
            _fold_dcd_latent_norm(m, m.fc_phi, m.bn2, m.p, m.latent_dim)
            done.append(f"{name}.bn2")
        elif isinstance(m, DCDLinear) and isinstance(m.bn2, _BN):
            _fold_dcd_latent_norm(m, m.fc_phi, m.bn2, m.cls_p, m.dim)
            done.append(f"{name}.bn2")
    return done


# -- which BatchNorm follows which layer: one traced forward pass


def _grad_fns(outputs) -> List[torch.autograd.graph.Node]:
    tensors = [t for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    return [t.grad_fn for t in tensors if t.grad_fn is not None]


def _consumers(roots: Sequence[torch.autograd.graph.Node]) -> Dict[torch.autograd.graph.Node, int]:
    """How many graph edges point at each autograd node reachable from ``roots``."""
    counts: Dict[torch.autograd.graph.Node, int] = {}
    seen, stack = set(roots), list(roots)
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            counts[nxt] = counts.get(nxt, 0) + 1
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return counts


def _computes_affine(bn: _BN) -> bool:
    """Whether ``bn`` is the eval-mode affine map of its running statistics: it has them, and no hook changes
    its output (dynconv's DCD / DGC models normalise with batch statistics until trained, see
    :func:`dynconv.models.use_batch_statistics_until_trained`)."""
    if bn.running_mean is None or bn.running_var is None or bn._forward_pre_hooks:
        return False
    if getattr(bn, FRESH_ATTR, False) and int(bn.num_batches_tracked) == 0:
        return False
    return all(hook is _fresh_norm_hook for hook in bn._forward_hooks.values())


def find_folds(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, str]]:
    """``(layer path, BatchNorm path)`` pairs whose BatchNorm can be folded into the layer (see module doc)."""
    names = {m: n for n, m in model.named_modules()}
    produced: Dict[int, Tuple[nn.Module, torch.Tensor, int]] = {}
    calls: Dict[nn.Module, int] = {}
    normed: List[Tuple[nn.Module, torch.Tensor, int]] = []
    hooks = []

    def on_output(module, args, output):
        calls[module] = calls.get(module, 0) + 1
        if isinstance(output, torch.Tensor):
            # the tensor is kept alive (ids stay unique); its version tells an in-place change before the norm
            produced[id(output)] = (module, output, output._version)

    def on_norm_input(module, args):
        calls[module] = calls.get(module, 0) + 1
        if args and isinstance(args[0], torch.Tensor):
            normed.append((module, args[0], args[0]._version))

    for m in model.modules():
        if isinstance(m, _BN):
            hooks.append(m.register_forward_pre_hook(on_norm_input))
        elif _folder(m) is not None and not m._forward_hooks:
            hooks.append(m.register_forward_hook(on_output))
    try:
        with torch.enable_grad():
            x = example.detach().clone().requires_grad_(True)
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    roots = _grad_fns(out)
    edges = _consumers(roots)
    pairs = []
    for bn, y, version in normed:
        found = produced.get(id(y))
        if found is None or found[1] is not y or found[2] != version or y.grad_fn is None:
            continue
        layer = found[0]
        if (calls.get(layer) != 1 or calls.get(bn) != 1 or not _computes_affine(bn)
                or edges.get(y.grad_fn, 0) != 1 or y.grad_fn in roots):
            continue
        pairs.append((names[layer], names[bn]))
    return pairs


def _norm_remainder(bn: _BN) -> nn.Module:
    """What is left of a folded norm: nothing, or the dropout and activation of timm's ``BatchNormAct2d``."""
    rest = [getattr(bn, a) for a in ("drop", "act") if isinstance(getattr(bn, a, None), nn.Module)]
    rest = [m for m in rest if not isinstance(m, nn.Identity)]
    if not rest:
        return nn.Identity()
    return rest[0] if len(rest) == 1 else nn.Sequential(*rest)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _default_example(model: nn.Module) -> torch.Tensor:
    """A batch of two 64 px random images with the model's input channels (timm's ``pretrained_cfg`` or
    the first convolution's)."""
    channels = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (None,))[0]
    if channels is None:
        first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, DynamicConv2dBase))), None)
        channels = first.in_channels if first is not None else 3
    param = next(model.parameters())
    return torch.randn(2, channels, 64, 64, device=param.device, dtype=param.dtype)


@torch.no_grad()
def deploy(model: nn.Module, example: Optional[torch.Tensor] = None, report: Optional[list] = None) -> nn.Module:
    """An inference copy of ``model``: BatchNorms folded into the layers before them, exactly.

    Args:
        model: any model; dynconv layers and plain ``nn.Conv2d`` / ``nn.Linear`` are folded into.
        example: an input for the one traced forward that finds which norm follows which layer (default
            ``(2, C, 64, 64)`` random, ``C`` from the first conv); any size the model accepts.
        report: a list that receives the folded ``(layer path, norm path)`` pairs, and ``("", norm path)`` for
            the norms folded inside a layer (DCD's ``bn2``, through ``P``).

    Returns:
        A deep copy in eval mode whose eval outputs equal ``model``'s (to rounding) and whose parameters do
        not require gradients. Training it is not supported. ``model`` is not changed.
    """
    deployed = copy.deepcopy(model).eval()
    for p in deployed.parameters():
        p.requires_grad_(False)
    precomputed = _precompute(deployed)
    example = _default_example(deployed) if example is None else example
    pairs = find_folds(deployed, example)
    for layer_name, bn_name in pairs:
        bn = deployed.get_submodule(bn_name)
        layer = deployed.get_submodule(layer_name)
        dtype = next(layer.parameters()).dtype
        scale, shift = bn_affine(bn)
        new = _folder(layer)(layer, scale.to(dtype), shift.to(dtype))
        if new is not layer:
            _replace(deployed, layer_name, new)
        _replace(deployed, bn_name, _norm_remainder(bn))
    for p in deployed.parameters():  # the new biases
        p.requires_grad_(False)
    fuse_attentions(deployed)
    deployed(example)  # builds the inference caches now (DGC's weight layout, IC-Conv's packed kernels)
    if report is not None:
        report.extend(pairs)
        report.extend(("", name) for name in precomputed)
    return deployed
