"""The attention branches as plain matrix products with their constants folded, for inference (:func:`dynconv.deploy`).

At batch 1 an attention's arithmetic is negligible and its time is the per-op cost of eager PyTorch (module
calls, dispatch), so the inference form runs as few ops as the math allows, with the BatchNorm (folded
into the first FC by ``deploy``) and the temperature at adoption inside the matrices.

ODConv's attention (Li et al., ICLR 2022, Sec. 3.2) is a pooled vector through one hidden layer (FC, BN,
ReLU) and then up to four heads, each an FC divided by the temperature and squashed. Once the BatchNorm is
folded into the hidden FC, the heads read the same hidden vector, so their weights stack into one matrix,
and with the temperature fixed it divides that matrix once instead of every output: the module form runs
six submodules (four 1x1 convolutions on a 1x1 map) and a division and squashing per head; this form runs
two ``addmm``, one sigmoid over the stacked gates and one softmax. DY-Conv's (Chen et al., CVPR 2020) takes
the temperature into its second FC. KernelWarehouse's (Li & Yao, ICML 2024) takes its BatchNorm into the
first FC and its fixed ``tau`` into one ``add``: ``(1 - tau) z + tau beta``, which at ``tau = 0`` (the end of
its schedule) is ``z``.

Inference only: a later temperature change (``set_progress``) or weight update does not reach the folded
matrices, which are non-persistent buffers (the state dict stays the module form's).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from .ops._routing import global_pool
from .ops.dyconv import DYAttention
from .ops.kernelwarehouse import KWAttention
from .ops.odconv import ODAttention

__all__ = ["FusedDYAttention", "FusedKWAttention", "FusedODAttention", "fuse_attentions"]


def _bias(layer: nn.Module) -> torch.Tensor:
    """The bias of an FC or 1x1 conv, zeros where it has none (one output per row of its weight)."""
    return layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.weight.shape[0])


class FusedODAttention(ODAttention):
    """An :class:`~dynconv.ops.odconv.ODAttention` whose hidden layer and heads are stacked matrices, with the
    folded BatchNorm and the temperature at adoption inside them. Inference only: a later temperature change
    (``set_progress``) or weight update does not reach the stacked matrices."""

    hidden_weight: torch.Tensor
    hidden_bias: torch.Tensor
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    gate_sizes: List[int]

    @classmethod
    def adopt(cls, attention: ODAttention) -> bool:
        """Stacks ``attention``'s matrices in place (a subclass swap); ``False`` (unchanged) while its
        BatchNorm is not folded into ``fc`` yet."""
        if isinstance(attention, cls) or not isinstance(attention.bn, nn.Identity):
            return False
        fc = attention.fc
        gates = [h for h in (attention.channel_fc, attention.filter_fc, attention.spatial_fc) if h is not None]
        heads = gates + ([attention.kernel_fc] if attention.kernel_fc is not None else [])
        t = attention.temperature
        with torch.no_grad():
            weight = torch.cat([h.weight.flatten(1) for h in heads]) / t
            bias = torch.cat([_bias(h) for h in heads]) / t
            hidden_bias = _bias(fc)
            attention.__class__ = cls
            # not persistent: the state dict stays the module form's
            attention.register_buffer("hidden_weight", fc.weight.flatten(1).t().contiguous(), persistent=False)
            attention.register_buffer("hidden_bias", hidden_bias.detach().clone(), persistent=False)
            attention.register_buffer("head_weight", weight.t().contiguous(), persistent=False)
            attention.register_buffer("head_bias", bias.contiguous(), persistent=False)
        attention.gate_sizes = [h.out_channels for h in gates]
        return True

    def forward(
        self, x: torch.Tensor
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        batch = x.shape[0]
        hidden = torch.relu(torch.addmm(self.hidden_bias, x.mean((2, 3)), self.hidden_weight))
        logits = torch.addmm(self.head_bias, hidden, self.head_weight)
        gated = sum(self.gate_sizes)
        gates = list(torch.sigmoid(logits[:, :gated]).split(self.gate_sizes, dim=1))
        a_c = gates.pop(0).reshape(batch, -1, 1, 1)
        a_f = gates.pop(0).reshape(batch, -1, 1, 1) if self.filter_fc is not None else None
        a_s = gates.pop(0).reshape(batch, 1, 1, *self.kernel_size) if self.spatial_fc is not None else None
        a_w = torch.softmax(logits[:, gated:], dim=1) if self.kernel_fc is not None else None
        return a_c, a_f, a_s, a_w


class FusedDYAttention(DYAttention):
    """A :class:`~dynconv.ops.dyconv.DYAttention` with the temperature at adoption in its second FC."""

    hidden_weight: torch.Tensor
    head_weight: torch.Tensor
    head_bias: torch.Tensor

    @classmethod
    def adopt(cls, attention: DYAttention) -> bool:
        if isinstance(attention, cls):
            return False
        t = attention.temperature
        with torch.no_grad():
            bias = _bias(attention.fc2)
            attention.__class__ = cls
            attention.register_buffer("hidden_weight", attention.fc1.weight.t().contiguous(), persistent=False)
            attention.register_buffer("head_weight", (attention.fc2.weight / t).t().contiguous(), persistent=False)
            attention.register_buffer("head_bias", bias / t, persistent=False)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(torch.mm(global_pool(x).flatten(1), self.hidden_weight))
        return torch.softmax(torch.addmm(self.head_bias, hidden, self.head_weight), dim=1)


class FusedKWAttention(KWAttention):
    """A :class:`~dynconv.ops.kernelwarehouse.KWAttention` with its BatchNorm folded into ``fc1`` (by
    ``deploy``) and its ``tau`` at adoption fixed; not for the LayerNorm form (ConvNeXt), which does not fold."""

    hidden_weight: torch.Tensor
    hidden_bias: torch.Tensor
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    offset: torch.Tensor
    fixed_tau: float

    @classmethod
    def adopt(cls, attention: KWAttention) -> bool:
        if isinstance(attention, cls) or not isinstance(attention.norm1, nn.Identity):
            return False
        fc1, fc2 = attention.fc1, attention.fc2
        tau = float(attention.temperature)
        with torch.no_grad():
            attention.__class__ = cls
            for name, value in (
                ("hidden_weight", fc1.weight.t()),
                ("hidden_bias", _bias(fc1)),
                ("head_weight", fc2.weight.t()),
                ("head_bias", _bias(fc2)),
                ("offset", tau * attention.temp_bias),
            ):
                attention.register_buffer(name, value.detach().contiguous().clone(), persistent=False)
        attention.fixed_tau = tau
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(torch.addmm(self.hidden_bias, x.mean((2, 3)), self.hidden_weight))
        logits = torch.addmm(self.head_bias, hidden, self.head_weight)
        if self.fc3 is not None:
            logits = self._expand_basis(logits)
        z = logits.reshape(-1, self.num_mixtures, self.num_cells + 1)
        z = z / (z.abs().sum(dim=2, keepdim=True) + 1e-3)
        if self.fixed_tau != 0.0:
            z = torch.add(self.offset, z, alpha=1.0 - self.fixed_tau)
        return z[..., :-1].reshape(-1, self.num_cells)


_FUSED = {ODAttention: FusedODAttention, DYAttention: FusedDYAttention, KWAttention: FusedKWAttention}


def fuse_attentions(model: nn.Module) -> List[str]:
    """Puts every attention of ``model`` that has an inference form in it (ODConv's whose BatchNorm is folded,
    DY-Conv's, KernelWarehouse's whose BatchNorm is folded); returns their paths."""
    return [name for name, m in model.named_modules()
            if any(isinstance(m, base) and fused.adopt(m) for base, fused in _FUSED.items())]
