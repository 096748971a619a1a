"""FDConv: frequency dynamic convolution.

Chen, Gu, Li, Yan, Fu, "Frequency Dynamic Convolution for Dense Image Prediction", CVPR 2025,
arXiv:2503.18783. Checked against the official code, Linwei-Chen/FDConv
(``FDConv_detection/mmdet_custom/FDConv.py``, class ``FDConv`` and its modules), with the defaults of the
official detection configs (``FDConv_detection/configs/{faster,mask}_rcnn/*_FDConv.py``).

A layer has the paper's three parts (its Fig. 2 and method section; equations named here by what they do):

- Fourier Disjoint Weight (FDW): the kernel ``W`` (``C_out x C_in x k x k``), laid out as the
  ``C_out k x C_in k`` matrix ``M[o k + i, c k + j] = W[o, c, i, j]``, is held as its real 2-D spectrum
  ``F = rfft2(M)`` (``dft_weight``). The spectral bins, sorted by their distance to the zero frequency, are
  cut into ``n`` disjoint groups; sample ``b`` gets the kernel ``irfft2(alpha * a_b[g(u)] * F[u])``, i.e. a
  mixture of ``n`` frequency-disjoint kernels with weights ``a_b`` (all in one inverse transform).
- Kernel Spatial Modulation (KSM): the kernel is multiplied element-wise by a global part
  (ODConv-like channel, filter and spatial attentions from the pooled input, plus the kernel attention
  ``a_b`` above) and a local part (a 1-D convolution over the pooled channels giving one logit per kernel
  element, ``C_out k^2`` per input channel).
- Frequency Band Modulation (FBM): before the convolution, the input is split into frequency
  bands by square low-pass masks of the real 2-D FFT, and each band but the lowest is scaled by a spatial
  map from a 3x3 conv of the input. The paper describes FBM as splitting the weight into bands and modulating
  each band's response per position; the official code (followed here) modulates the input's bands before
  the one convolution, which equals it for the band split (conv and band-pass commute) but applies the maps
  before the kernel rather than after it.

Where the official code differs from a plain reading of the paper it is followed (see the comments):
the spectrum normalisation (``dft_weight = rfft2(M) / (min(C_in, C_out) // 2)`` and
``alpha = min(C_in, C_out) // 2 * n``), the ``2 * sigmoid`` attentions (``att_multi``) and the
``2 / n * sigmoid`` kernel attention, StarReLU in the attention MLP, and FBM's band masks built once on a
64 x 64 grid and resampled (nearest) to each feature map's spectrum.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._base import DynamicConv2dBase, IntOrPair, Padding, init_bias_like_conv
from ._norm import SafeBatchNorm2d
from .functional import per_sample_conv2d
from .kernels import Kernels


def spectral_groups(height: int, width: int, groups: int) -> torch.Tensor:
    """Group index of each bin of a ``height x width`` real 2-D spectrum (``rfft2``), ``(height, width // 2 + 1)``.

    The bins are sorted by their distance to the zero frequency (``get_fft2freq`` in the official
    ``FDConv.py``) and cut into ``groups`` consecutive runs, the low frequencies in group 0. The official code
    computes the distances in float32 and splits the sorted list with ``reshape(2, kernel_num, -1)``, which
    needs the bin count to divide by ``groups``; here the split is ``rank * groups // bins``, the same runs
    where it divides and near-equal runs where it does not. Many bins lie at equal distances (``+f`` and
    ``-f``); the official code orders them with the default (unstable) ``torch.sort`` on CPU, and so does this
    function, so that the groups straddling equal distances are the official ones (a stable sort would move
    a few bins across group boundaries, and official checkpoints would no longer give the official outputs).
    """
    fh = torch.fft.fftfreq(height, dtype=torch.float32)
    fw = torch.fft.rfftfreq(width, dtype=torch.float32)
    dist = torch.stack(torch.meshgrid(fh, fw, indexing="ij"), dim=-1).norm(dim=-1).flatten()
    order = torch.sort(dist).indices
    bins = order.numel()
    group = torch.empty(bins, dtype=torch.long)
    group[order] = torch.arange(bins) * groups // bins
    return group.reshape(height, width // 2 + 1)


def _fft_dtype(dtype: torch.dtype) -> torch.dtype:
    """FFTs run in float32 for half / bfloat16 tensors (torch has no bfloat16 FFT, and half FFTs only for
    power-of-two sizes on CUDA); the official code, too, builds its spectra and FBM bands in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def kernel_to_matrix(weight: torch.Tensor) -> torch.Tensor:
    """``(C_out, C_in, kh, kw)`` -> ``(C_out kh, C_in kw)``: the matrix FDW transforms (official
    ``permute(0, 2, 1, 3)``)."""
    c_out, c_in, kh, kw = weight.shape
    return weight.permute(0, 2, 1, 3).reshape(c_out * kh, c_in * kw)


def matrix_to_kernel(matrix: torch.Tensor, c_out: int, c_in: int, kh: int, kw: int) -> torch.Tensor:
    """Inverse of :func:`kernel_to_matrix` on the last two dims (leading dims kept)."""
    lead = matrix.shape[:-2]
    return matrix.reshape(*lead, c_out, kh, c_in, kw).transpose(-3, -2)


class StarReLU(nn.Module):
    """``s * relu(x)^2 + b`` with learnable scalars ``s`` (1) and ``b`` (0); the activation of FDConv's
    attention MLP (official ``StarReLU``, from MetaFormer, Yu et al. 2022)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.relu(x) ** 2 + self.bias


class KSMGlobal(nn.Module):
    """The global branch of KSM: channel, filter, spatial and kernel attentions from the pooled input.

    Official ``KernelSpatialModulation_Global``: a 1x1 conv to ``max(int(C_in * reduction), 16)``
    channels, BatchNorm, StarReLU, then one 1x1 conv per head. Channel, filter and spatial attentions are
    ``att_multi * sigmoid(z / temp)``; the kernel attention is ``2 / n * sigmoid(z / kernel_temp)``
    (so ``1 / n`` each at ``z = 0``). Heads that would be constant are absent as in the official code:
    no filter head for a depthwise layer, no spatial head for a 1x1 kernel, no kernel head for ``n = 1``.
    Initialisation as the official ``_initialize_weights``: kaiming fan-out, biases 0, then the channel,
    spatial and kernel heads' weights normal(0, 1e-6). The filter head keeps its kaiming weights: the
    official code tests ``isinstance(self.func_filter, nn.Conv2d)``, a bound method, so it never reaches it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, groups: int = 1,
                 reduction: float = 0.0625, kernel_num: int = 64, min_channel: int = 16,
                 temp: float = 1.0, kernel_temp: float = 1.0, att_multi: float = 2.0) -> None:
        super().__init__()
        hidden = max(int(in_channels * reduction), min_channel)
        self.kernel_size = kernel_size
        self.kernel_num = kernel_num
        self.temp, self.kernel_temp, self.att_multi = temp, kernel_temp, att_multi
        self.fc = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.bn = SafeBatchNorm2d(hidden)
        self.relu = StarReLU()
        self.channel_fc = nn.Conv2d(hidden, in_channels, 1)
        depthwise = in_channels == groups == out_channels
        self.filter_fc = None if depthwise else nn.Conv2d(hidden, out_channels, 1)
        self.spatial_fc = None if kernel_size == 1 else nn.Conv2d(hidden, kernel_size * kernel_size, 1)
        self.kernel_fc = None if kernel_num == 1 else nn.Conv2d(hidden, kernel_num, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for head in (self.spatial_fc, self.kernel_fc, self.channel_fc):
            if head is not None:
                nn.init.normal_(head.weight, std=1e-6)

    def forward(self, pooled: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``pooled`` ``(B, C_in, 1, 1)`` -> channel ``(B, C_in)``, filter ``(B, C_out)`` or None, spatial
        ``(B, k * k)`` or None, kernel ``(B, n)`` or None."""
        h = self.relu(self.bn(self.fc(pooled)))
        m = self.att_multi
        a_c = torch.sigmoid(self.channel_fc(h).flatten(1) / self.temp) * m
        a_f = torch.sigmoid(self.filter_fc(h).flatten(1) / self.temp) * m if self.filter_fc is not None else None
        a_s = torch.sigmoid(self.spatial_fc(h).flatten(1) / self.temp) * m if self.spatial_fc is not None else None
        a_k = None
        if self.kernel_fc is not None:
            a_k = torch.sigmoid(self.kernel_fc(h).flatten(1) / self.kernel_temp) * 2 / self.kernel_num
        return a_c, a_f, a_s, a_k


def eca_kernel_size(channels: int) -> int:
    """ECA's adaptive 1-D kernel size (Wang et al., CVPR 2020, gamma 2, b 1), as the official
    ``KernelSpatialModulation_Local`` writes it: ``round(log2(C) / 2 + 0.5) // 2 * 2 + 1`` (Python's round)."""
    return round(math.log2(channels) / 2 + 0.5) // 2 * 2 + 1


class KSMLocal(nn.Module):
    """The local branch of KSM: one logit per kernel element from the pooled input channels.

    Official ``KernelSpatialModulation_Local`` (``use_global=False``): LayerNorm over the ``C_in`` pooled
    values, then a 1-D convolution along the channel axis (ECA kernel size, no bias, weights 1e-6) with
    ``C_out k^2`` output channels; logit ``[o, c, i, j]`` is output channel ``(o k + i) k + j`` at channel
    position ``c``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        size = eca_kernel_size(in_channels)
        self.out_channels, self.kernel_size = out_channels, kernel_size
        self.conv = nn.Conv1d(1, out_channels * kernel_size * kernel_size, size, padding=(size - 1) // 2, bias=False)
        nn.init.constant_(self.conv.weight, 1e-6)
        self.norm = nn.LayerNorm(in_channels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, 1, 1)`` -> logits ``(B, C_out, C_in, k, k)``."""
        z = self.conv(self.norm(pooled.flatten(1))[:, None])  # (B, C_out k k, C_in)
        k = self.kernel_size
        return z.reshape(z.shape[0], self.out_channels, k, k, -1).permute(0, 1, 4, 2, 3)


def band_masks(k_list: Sequence[int], size: Tuple[int, int] = (64, 64)) -> torch.Tensor:
    """FBM's low-pass masks on a ``size`` real spectrum: bin ``(u, v)`` passes band ``k`` when
    ``max(|f_u|, |f_v|) < 0.5 / k`` (official ``FrequencyBandModulation._precompute_masks``),
    ``(len(k_list), 1, h, w // 2 + 1)``.

    The official test is ``freq < 0.5 / k + 1e-8`` on float32 frequencies: the bins at exactly ``0.5 / k`` are
    out for k = 2 (the sum rounds back to 1/4) and in for k = 4, 8. Kept: computed in float32 whatever the
    default dtype.
    """
    fh = torch.fft.fftfreq(size[0], dtype=torch.float32)
    fw = torch.fft.rfftfreq(size[1], dtype=torch.float32)
    freq = torch.maximum(fh.abs()[:, None], fw.abs()[None, :])
    return torch.stack([freq < torch.tensor(0.5 / k + 1e-8, dtype=torch.float32) for k in k_list])[:, None]


class FBM(nn.Module):
    """Frequency Band Modulation: ``y = sum_i A_i(x) * (L_{i-1}(x) - L_i(x)) + L_last(x)``.

    ``L_i`` is the low-pass of ``x`` through band mask ``i`` (``rfft2`` / ``irfft2``, orthonormal) with
    ``L_0 = x``, and ``A_i = 2 sigmoid(conv3x3_i(x))`` a one-channel spatial map shared by all channels (official
    ``FrequencyBandModulation`` with ``spatial_group=1``, ``lowfreq_att=False``, ``fs_feat='feat'``,
    ``act='sigmoid'``, ``init='zero'``: weights normal(0, 1e-6), bias 0). As in the official code the masks
    are built once on a 64 x 64 grid and resampled (nearest) to each map's spectrum, not rebuilt per size.
    """

    def __init__(self, in_channels: int, k_list: Sequence[int] = (2, 4, 8), spatial_kernel: int = 3) -> None:
        super().__init__()
        self.k_list = tuple(k_list)
        self.freq_weight_conv_list = nn.ModuleList()
        for _ in self.k_list:
            conv = nn.Conv2d(in_channels, 1, spatial_kernel, padding=spatial_kernel // 2)
            nn.init.normal_(conv.weight, std=1e-6)
            nn.init.zeros_(conv.bias)
            self.freq_weight_conv_list.append(conv)
        self.register_buffer("cached_masks", band_masks(self.k_list), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        signal = x.to(_fft_dtype(x.dtype))
        spectrum = torch.fft.rfft2(signal, norm="ortho")
        # float32 as the official code (the nearest-neighbour indices are computed in the input's precision)
        masks = F.interpolate(self.cached_masks.float(), size=(h, w // 2 + 1), mode="nearest").to(signal.dtype)
        out, previous = None, signal
        for mask, conv in zip(masks, self.freq_weight_conv_list):
            low = torch.fft.irfft2(spectrum * mask, s=(h, w), norm="ortho")
            band = (torch.sigmoid(conv(x)) * 2).to(signal.dtype) * (previous - low)
            out = band if out is None else out + band
            previous = low
        return (previous if out is None else out + previous).to(x.dtype)


class FDConv2d(DynamicConv2dBase):
    """Drop-in ``nn.Conv2d`` with FDConv's FDW kernels, KSM and FBM (official detection defaults).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as ``nn.Conv2d``
            (square kernels, ``groups=1``: FDW transforms the whole ``C_out k x C_in k`` kernel matrix).
        kernel_num: number of disjoint frequency groups ``n`` (64).
        reduction, min_channel: KSM's hidden width ``max(int(C_in * reduction), min_channel)`` (1/16, 16).
        att_multi: scale of the sigmoid attentions (2: each is 1 at a zero logit).
        kernel_temp: temperature of the kernel attention (1); ``temp``: of the other global attentions
            (``None``: ``kernel_temp``, as the official code).
        use_ksm_local: the local KSM branch (True).
        use_fbm_if_k_in: kernel sizes whose layers get FBM ((3,)); ``use_fbm_for_stride``: FBM also on strided
            layers of other kernel sizes (False).
        fbm_k_list: FBM's band divisors ((2, 4, 8): cut-offs 1/4, 1/8, 1/16 cycles per pixel).

    State-dict names are the official ones (``dft_weight``, ``KSM_Global.*``, ``KSM_Local.*``, ``FBM.*``), so
    official checkpoints load unchanged.
    """

    attention_children = ("KSM_Global", "KSM_Local", "FBM")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: Padding = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
        kernel_num: int = 64,
        reduction: float = 0.0625,
        min_channel: int = 16,
        att_multi: float = 2.0,
        kernel_temp: float = 1.0,
        temp: Optional[float] = None,
        use_ksm_local: bool = True,
        use_fbm_if_k_in: Sequence[int] = (3,),
        use_fbm_for_stride: bool = False,
        fbm_k_list: Sequence[int] = (2, 4, 8),
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        kh, kw = self.kernel_size
        if groups != 1 or kh != kw:
            raise ValueError(f"FDConv2d needs groups=1 and a square kernel, got groups={groups}, "
                             f"kernel {self.kernel_size}")
        self.kernel_num = kernel_num
        self.att_multi = att_multi
        # Official normalisation: the spectrum is stored divided by min(C_in, C_out) // 2 and scaled back
        # by alpha = that * n in the forward, so that n kernel attentions of 1/n give the kernel itself.
        self.spectrum_scale = max(min(in_channels, out_channels) // 2, 1)
        self.alpha = float(self.spectrum_scale * kernel_num)
        self.KSM_Global = KSMGlobal(in_channels, out_channels, kh, groups, reduction, kernel_num, min_channel,
                                    kernel_temp if temp is None else temp, kernel_temp, att_multi)
        self.KSM_Local = KSMLocal(in_channels, out_channels, kh) if use_ksm_local else None
        with_fbm = kh in tuple(use_fbm_if_k_in) or (use_fbm_for_stride and self.stride[0] > 1)
        self.FBM = FBM(in_channels, fbm_k_list) if with_fbm else None
        rows, cols = out_channels * kh, in_channels * kw
        self.dft_weight = nn.Parameter(torch.empty(1, rows, cols // 2 + 1, 2))
        self.register_buffer("groups_of_bins", spectral_groups(rows, cols, kernel_num), persistent=False)
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        # nn.Conv2d's default init, then the official conversion (``convert2dftweight``)
        weight = torch.empty(out_channels, in_channels, kh, kw)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.set_kernel(weight)
        init_bias_like_conv(self.bias, in_channels * kh * kw)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **kwargs) -> "FDConv2d":
        """As ``DynamicConv2dBase.from_conv``; the kernel starts at ``conv``'s (FDW is a change of basis, not a
        bank, so the official code converts the static kernel into the spectrum)."""
        layer = super().from_conv(conv, **kwargs)
        with torch.no_grad():
            layer.set_kernel(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    @torch.no_grad()
    def set_kernel(self, weight: torch.Tensor) -> None:
        """``dft_weight = rfft2(M(weight)) / (min(C_in, C_out) // 2)``: official ``convert2dftweight`` and
        ``tools/convert_to_fdconv.py``."""
        matrix = kernel_to_matrix(weight.to(self.dft_weight.device, _fft_dtype(self.dft_weight.dtype)))
        spectrum = torch.fft.rfft2(matrix, dim=(0, 1))
        self.dft_weight.copy_(torch.stack([spectrum.real, spectrum.imag], dim=-1)[None] / self.spectrum_scale)

    def static_kernel(self) -> torch.Tensor:
        """The kernel whose spectrum ``dft_weight`` holds (what every sample gets with all attentions at 1 and the
        kernel attention at ``1 / n``), ``(C_out, C_in, k, k)``."""
        spectrum = self.dft_weight[0].to(_fft_dtype(self.dft_weight.dtype))
        return self._from_spectrum(torch.view_as_complex(spectrum.contiguous()) * self.spectrum_scale)

    def _from_spectrum(self, spectrum: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        # s= keeps odd C_in * k (the official irfft2 without s= would return one column less and fail)
        matrix = torch.fft.irfft2(spectrum, s=(self.out_channels * kh, self.in_channels * kw), dim=(-2, -1))
        return matrix_to_kernel(matrix.to(self.dft_weight.dtype), self.out_channels, self.in_channels, kh, kw)

    def fdw_kernels(self, a_k: Optional[torch.Tensor]) -> torch.Tensor:
        """FDW: per-sample kernels ``irfft2(alpha * a_k[g(u)] * F[u])``, ``(B, C_out, C_in, k, k)``
        (``(C_out, C_in, k, k)`` without a kernel head)."""
        if a_k is None:  # n = 1: one group, attention 1
            return self.static_kernel()
        dtype = _fft_dtype(self.dft_weight.dtype)
        scaled = torch.view_as_complex(self.dft_weight[0].to(dtype) * self.alpha)  # official order: (F * alpha) * a
        # (B, rows, cols // 2 + 1); index_select's backward is an index_add, far cheaper than indexing's index_put
        per_bin = a_k.index_select(1, self.groups_of_bins.flatten()).reshape(-1, *self.groups_of_bins.shape)
        per_bin = per_bin.to(dtype)
        return self._from_spectrum(scaled * per_bin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean((2, 3), keepdim=True)
        a_c, a_f, a_s, a_k = self.KSM_Global(pooled)
        weight = self.fdw_kernels(a_k)
        if self.KSM_Local is not None:
            # the local factors att_multi * sigmoid(l) and the spatial attention in one product with the kernels
            # (the scalar and the per-tap factors ride on the small (B, k, k) tensor), in the FFT's
            # (C_out, k, C_in, k) layout, then one copy into the conv's layout
            kh, kw = self.kernel_size
            factor = torch.full((1, kh, 1, kw), self.att_multi, dtype=weight.dtype, device=weight.device)
            if a_s is not None:
                factor = a_s.reshape(-1, kh, 1, kw) * self.att_multi
                a_s = None
            local = torch.sigmoid(self.KSM_Local(pooled)).transpose(-3, -2) * factor[:, None]
            weight = (weight.transpose(-3, -2) * local).transpose(-3, -2)
        weight = weight.contiguous()
        if self.FBM is not None:
            x = self.FBM(x)
        # channel attention on the input and filter attention on the output: exact (conv is linear per
        # channel), the official code's choice for large kernels; spatial attention per kernel tap
        y = per_sample_conv2d(x, Kernels(weight, spatial=a_s, in_channel=a_c), None, **self._conv_kwargs())
        a_f = self.output_scale(a_f)
        if a_f is not None:
            y = y * a_f[:, :, None, None]
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y

    def output_scale(self, a_f: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The per-sample factor of each output channel, ``(B, C_out)`` or None: the filter attention (a deployed
        layer multiplies a folded BatchNorm scale into it, ``dynconv.deploy``)."""
        return a_f

    def elementwise_macs(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, int]:
        """MACs an op counter does not see (it counts convolutions and matmuls only).

        ``aggregation``: building the kernels: the spectrum times the kernel attention (``numel(F)``), the
        inverse real FFT counted as ``5/2 N log2 N`` real MACs for ``N = C_out k C_in k`` (the usual
        ``5 N log2 N`` flops of a radix-2 FFT, halved for a real transform, as MACs), and the KSM products on the
        kernel (local and spatial, one each per kernel element). ``scaling``: channel and filter attentions on
        the maps, and FBM: per band a forward and inverse real FFT of every channel (``5/2 HW log2 HW`` MACs
        each) plus the mask, difference and scaling (3 per element).
        """
        kh, kw = self.kernel_size
        n_kernel = self.out_channels * self.in_channels * kh * kw
        fft = lambda n: int(2.5 * n * math.log2(n)) if n > 1 else 0  # noqa: E731
        spectrum_bins = self.dft_weight[0, ..., 0].numel()
        factors = (self.KSM_Local is not None) + (self.KSM_Global.spatial_fc is not None)
        aggregation = 2 * spectrum_bins + fft(n_kernel) + factors * n_kernel
        scaling = x[0].numel() + (y[0].numel() if self.KSM_Global.filter_fc is not None else 0)
        if self.FBM is not None:
            c, h, w = x.shape[1:]
            bands = len(self.FBM.k_list)
            scaling += c * fft(h * w) * (bands + 1) + 3 * bands * c * h * w
        return {"aggregation": aggregation * x.shape[0], "scaling": scaling * x.shape[0]}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel_num={self.kernel_num}, fbm={self.FBM is not None}"
