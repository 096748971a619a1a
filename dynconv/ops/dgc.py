"""DGC: dynamic group convolution.

Su, Fang, Yu, Liu, Wang, Chen, Huang, "Dynamic Group Convolution for Accelerating Convolutional
Neural Networks", ECCV 2020, arXiv:2007.04242. Checked against the official code,
zhuogege1943/dgc (``layers.py``: ``DynamicMultiHeadConv``, ``HeadConv``; ``models/dynamic_resnet.py``):

- the input is normalised and activated inside the layer, ``x <- ReLU(BN(x))`` (``norm``);
- each of ``heads`` heads has a saliency generator ``g_h = ReLU(fc2(ReLU(fc1(GAP(x)))))``
  (``fc1`` without bias to ``C_in / s`` with ``s = squeeze_rate``, halved when ``C_in < 80``;
  ``fc2`` back to ``C_in`` with its bias initialised to 1) and its own conv ``C_in -> C_out / heads``;
- per sample and head the ``inactive`` input channels of lowest saliency are zeroed (ties with the
  largest pruned value too, as the official ``<=`` test does) and the head convolves ``x * g_h``;
- outputs are head-interleaved: channel ``j`` of head ``h`` is output channel ``j * heads + h``;
- the lasso term of a head is the mean of ``g_h`` over batch and channels, summed over heads.

Parameter names follow the official layer (``norm``, ``headconv_{h}.conv``, ``headconv_{h}.fc1``,
``headconv_{h}.fc2``, the ``_inactive_channels`` buffer) so official checkpoints load.

Computation. The official code concatenates the ``heads`` masked copies of the input and runs one
grouped convolution: dense work and ``heads`` times the input's memory. Here the saliencies scale
the *kernel* instead (``conv(x * g) = conv_{W * g}(x)``), giving one per-sample kernel in
interleaved order that goes through the shared batched path; in eval mode the layer really skips
the pruned channels: it gathers, per sample and head, only the kept input channels and the
matching kernel slices and runs one grouped convolution with ``groups = heads`` (see
:meth:`DGCConv2d.forward_sparse`), which costs the kept fraction of the dense MACs.

Departures: ``fc1`` keeps at least one unit for very narrow layers (the official layer would have
none); ``preactivation=False`` drops the internal BN-ReLU for backbones whose convs already see
normalised, activated inputs (MobileNetV2, ConvNeXt: no official DGC model exists there); an
optional static bias is added last.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import is_compiling
from ..schedules import dgc_pruning
from . import _cpu_tuning
from ._base import DynamicConv2dBase, IntOrPair, Padding
from ._scheduled import ScheduledModule
from .functional import conv_patches, per_sample_conv2d
from .kernels import Kernels

LASSO_LAMBDA = 1e-5  # official --group-lasso-lambda default


class SaliencyHead(nn.Module):
    """One head of DGC: its saliency generator and its conv (official ``HeadConv``).

    Only the saliency generator runs as a module; the conv's weight is read by :class:`DGCConv2d`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Tuple[int, int], squeeze_rate: int) -> None:
        super().__init__()
        if in_channels < 80:
            squeeze_rate = max(squeeze_rate // 2, 1)
        hidden = max(in_channels // squeeze_rate, 1)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=False)
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, in_channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.kaiming_normal_(self.fc1.weight)
        nn.init.kaiming_normal_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, 1.0)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Saliency ``(B, C_in)`` of the pooled input ``(B, C_in)``."""
        return F.relu(self.fc2(F.relu(self.fc1(pooled))))


def gate(saliency: torch.Tensor, inactive: int) -> torch.Tensor:
    """Zero, per row of ``saliency`` (..., C), the ``inactive`` smallest entries and every entry tied
    with the largest of them (official ``HeadConv``: top-k smallest on a detached copy, then ``<=``)."""
    if inactive <= 0:
        return saliency
    detached = saliency.detach()
    threshold = detached.topk(inactive, dim=-1, largest=False, sorted=False).values.amax(-1, keepdim=True)
    return saliency.masked_fill(detached <= threshold, 0.0)


def _contiguous_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * b`` written straight into a contiguous tensor when ``a`` is a strided view (one pass
    instead of a product that keeps ``a``'s strides plus a copy); autograd cannot use ``out=``."""
    if is_compiling() or (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return (a * b).contiguous()
    out = torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=a.dtype, device=a.device)
    return torch.mul(a, b, out=out)


class DGCConv2d(DynamicConv2dBase, ScheduledModule):
    """Drop-in ``nn.Conv2d`` with DGC's per-head saliency gating of input channels.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as ``nn.Conv2d``
            (``groups`` must be 1; both widths divisible by ``heads``).
        heads: number of heads (4 in the paper).
        pruning_rate: share of input channels each head drops at the end of the schedule
            (official ``gate_factor = 1 - pruning_rate``; 0.55 in the ImageNet ResNet18 run).
        squeeze_rate: saliency-generator reduction (16, halved below 80 input channels).
        preactivation: apply the official internal ``ReLU(BN(x))`` first.
        lasso_lambda: weight of the lasso term the layer records for :func:`dynconv.auxiliary_loss`.
        schedule: pruned share of the target as a function of epochs (default
            :func:`dynconv.schedules.dgc_pruning`, 120 epochs); a fresh layer is fully pruned.
        sparse: ``None`` (default) skips pruned channels in eval mode, ``True`` always, ``False`` never.
    """

    matmul_macs_kind = "dynamic_conv"  # the sparse path's unfold + matmul is the convolution

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: Padding = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = False,
        heads: int = 4,
        pruning_rate: float = 0.55,
        squeeze_rate: int = 16,
        preactivation: bool = True,
        lasso_lambda: float = LASSO_LAMBDA,
        schedule: Optional[Callable[[float], float]] = None,
        sparse: Optional[bool] = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        if groups != 1:
            raise ValueError(f"DGCConv2d needs groups=1 (each head sees every input channel), got {groups}")
        if in_channels % heads or out_channels % heads:
            raise ValueError(f"DGC needs in_channels ({in_channels}) and out_channels ({out_channels}) divisible "
                             f"by heads ({heads})")
        if not 0.0 <= pruning_rate < 1.0:
            raise ValueError(f"pruning_rate must be in [0, 1), got {pruning_rate}")
        self.heads = heads
        self.pruning_rate = pruning_rate
        self.lasso_lambda = lasso_lambda
        self.sparse = sparse
        self.norm = nn.BatchNorm2d(in_channels) if preactivation else None
        for h in range(heads):
            self.add_module(f"headconv_{h}", SaliencyHead(in_channels, out_channels // heads, self.kernel_size,
                                                          squeeze_rate))
        self.attention_children = tuple(f"headconv_{h}" for h in range(heads))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.register_buffer("_inactive_channels", torch.zeros(1))
        self.auxiliary_loss: Optional[torch.Tensor] = None
        self._weight_cache: Optional[Tuple[tuple, torch.Tensor]] = None
        self.init_schedule(schedule or dgc_pruning())
        self.set_schedule_value(self.schedule(float("inf")))

    # -- schedule -----------------------------------------------------------------------------

    @property
    def inactive_channels(self) -> int:
        """Input channels each head drops per sample now."""
        return self._inactive

    def set_schedule_value(self, value: float) -> None:
        self._inactive = round(self.in_channels * self.pruning_rate * value)
        self._inactive_channels.fill_(self._inactive)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._inactive = int(self._inactive_channels.item())

    # -- forward ------------------------------------------------------------------------------

    def head_modules(self) -> Tuple[SaliencyHead, ...]:
        return tuple(getattr(self, f"headconv_{h}") for h in range(self.heads))

    def head_weights(self) -> torch.Tensor:
        """``(heads, C_out / heads, C_in, kh, kw)``."""
        return torch.stack([head.conv.weight for head in self.head_modules()])

    def saliency(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(gated saliency (B, heads, C_in), lasso term)`` of the (pre-activated) input."""
        pooled = x.mean((2, 3))
        raw = torch.stack([head(pooled) for head in self.head_modules()], dim=1)
        return gate(raw, self._inactive), raw.mean((0, 2)).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = F.relu(self.norm(x), inplace=True)
        saliency, lasso = self.saliency(x)
        self.auxiliary_loss = self.lasso_lambda * lasso if self.training else None
        if self._uses_sparse_path():
            out = self.forward_sparse(x, saliency)
        else:
            out = self.forward_dense(x, saliency)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def forward_dense(self, x: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
        """Every head over every input channel: head ``h`` is its own (shared) kernel over the input scaled
        by its saliencies, ``conv(x * s_h, W_h)`` (the same as scaling the kernel's input channels), and
        the heads' outputs interleave (output channel ``o * heads + h``). No per-sample kernels: in
        training those (``B`` x the weights, and as much again for their gradient) were the layer's
        largest tensors; each scaled input is rebuilt in the backward."""
        if x.shape[0] == 1 and not torch.is_grad_enabled():  # one sample: one conv with folded kernels
            weight = self.head_weights().transpose(0, 1) * saliency[0][None, :, :, None, None]
            return F.conv2d(x, weight.reshape(self.out_channels, self.in_channels, *self.kernel_size), None,
                            self.stride, self.padding, self.dilation)
        outs = [per_sample_conv2d(x, Kernels(head.conv.weight, in_channel=saliency[:, h]), None, self.stride,
                                  self.padding, self.dilation) for h, head in enumerate(self.head_modules())]
        return torch.stack(outs, dim=2).flatten(1, 2)

    def sparse_width(self, device: torch.device) -> int:
        """Input channels each head reads on the sparse path: the kept ones, rounded up to the
        channel block of oneDNN's CPU kernels (:data:`~dynconv.ops._cpu_tuning.DGC_CHANNEL_BLOCK`, measured
        there). The extra channels are pruned ones, whose saliency is zero, so they change nothing but the
        work (which :meth:`elementwise_macs` takes back out of the MAC count)."""
        kept = self.in_channels - self._inactive
        block = _cpu_tuning.DGC_CHANNEL_BLOCK.get(device.type, 1)
        return min(self.in_channels, -(-kept // block) * block)

    def weight_by_input_channel(self) -> torch.Tensor:
        """``(heads, C_in, kh * kw, C_out / heads)``, contiguous, so gathering input channels copies
        whole rows, and the gathered rows are a matrix the sparse matmul reads transposed for free.
        Without autograd it is cached until a head's weight changes (on late layers rebuilding it
        would take as long as the convolution)."""
        if is_compiling() or (
                torch.is_grad_enabled() and any(h.conv.weight.requires_grad for h in self.head_modules())):
            return self._by_input_channel()  # (a compiled graph computes it inside the graph)
        key = tuple((h.conv.weight.data_ptr(), h.conv.weight._version) for h in self.head_modules())
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = (key, self._by_input_channel())
        return self._weight_cache[1]

    def _by_input_channel(self) -> torch.Tensor:
        w = self.head_weights()  # (heads, C_out/heads, C_in, kh, kw)
        return w.flatten(3).permute(0, 2, 3, 1).contiguous()

    def sparse_uses_matmul(self, out_pixels: int) -> bool:
        """Sparse path choice: a 1x1 conv is a matmul anyway, and with few output pixels the gathered
        kernels outweigh the activations, so a matmul over the unfolded inputs reads them in place;
        with many, oneDNN's grouped convolution wins
        (:data:`~dynconv.ops._cpu_tuning.DGC_SPARSE_MATMUL_MAX_PIXELS`)."""
        if isinstance(self.padding, str):
            return False
        return self.kernel_size == (1, 1) or out_pixels <= _cpu_tuning.DGC_SPARSE_MATMUL_MAX_PIXELS

    def forward_sparse(self, x: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
        """Only the kept channels: per sample and head, gather the input channels of highest
        saliency (a pruned tie keeps its zero saliency, so the result equals the dense path) and
        the matching kernel rows, then either one convolution with ``groups = heads`` or one
        batched matmul over the unfolded inputs."""
        batch, heads, c_in = x.shape[0], self.heads, self.in_channels
        c_head, taps = self.out_channels // heads, self.kernel_size[0] * self.kernel_size[1]
        width = self.sparse_width(x.device)
        values, index = saliency.topk(width, dim=-1, sorted=False)  # (B, heads, width)
        # index_select copies whole contiguous rows (much faster than advanced indexing).
        heads_first = torch.arange(heads, device=x.device).view(1, heads, 1) * c_in
        rows = self.weight_by_input_channel().reshape(heads * c_in, -1).index_select(0, (index + heads_first).flatten())
        rows = rows.view(batch, heads, width, taps, c_head)
        samples_first = torch.arange(batch, device=x.device).view(batch, 1, 1) * c_in
        inputs = x.reshape(batch * c_in, -1).index_select(0, (index + samples_first).flatten())
        inputs = inputs.view(batch, heads * width, *x.shape[2:])
        out_h, out_w = (self._out_size(x.shape[2 + axis], axis) for axis in (0, 1))
        if self.sparse_uses_matmul(out_h * out_w):
            patches = conv_patches(inputs.view(batch * heads, width, *x.shape[2:]), self.kernel_size, self.stride,
                                   self.padding, self.dilation)
            # Saliency scaling and im2col in one pass: (B * heads, width * taps, pixels).
            cols = _contiguous_product(patches, values.reshape(batch * heads, width, 1, 1, 1, 1))
            cols = cols.reshape(batch * heads, width * taps, -1)  # a view, unless a compiler chose other strides
            out = torch.bmm(rows.view(batch * heads, width * taps, c_head).transpose(1, 2), cols)
            return out.view(batch, heads, c_head, out_h, out_w).transpose(1, 2).reshape(batch, -1, out_h, out_w)
        # Conv layout (B, heads, C_out/heads, width, kh, kw), saliency-scaled in the same pass.
        kernels = _contiguous_product(rows.permute(0, 1, 4, 2, 3), values[:, :, None, :, None])
        kernels = kernels.view(batch, self.out_channels, width, *self.kernel_size)
        out = per_sample_conv2d(inputs, kernels, None, self.stride, self.padding, self.dilation, groups=heads)
        return out.view(batch, heads, c_head, out_h, out_w).transpose(1, 2).reshape(batch, -1, out_h, out_w)

    def _out_size(self, size: int, axis: int) -> int:
        if isinstance(self.padding, str):  # "same" (stride 1) or "valid"
            return size if self.padding == "same" else size - self.dilation[axis] * (self.kernel_size[axis] - 1)
        span = self.dilation[axis] * (self.kernel_size[axis] - 1) + 1
        return (size + 2 * self.padding[axis] - span) // self.stride[axis] + 1

    def _uses_sparse_path(self) -> bool:
        return (self.sparse if self.sparse is not None else not self.training) and self._inactive > 0

    def elementwise_macs(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, int]:
        """Takes the zero-saliency padding channels of the sparse path back out of the convolution's
        count, so that :func:`dynconv.count_macs` is the paper's: the kept share of the dense conv
        plus the saliency generators (the kernel scaling is not counted, as in the paper)."""
        if not self._uses_sparse_path():
            return {}
        padding = self.sparse_width(x.device) - (self.in_channels - self._inactive)
        taps = self.kernel_size[0] * self.kernel_size[1]
        return {"dynamic_conv": -y.shape[0] * y.shape[2] * y.shape[3] * self.out_channels * padding * taps}

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", heads={self.heads}, pruning_rate={self.pruning_rate}, "
                f"inactive_channels={self._inactive}")
