"""BatchNorms that normalise with the batch's own statistics until they have any (models whose layers multiply
by their input: DCD, DGC)."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._compat import is_exporting

FRESH_ATTR = "_dynconv_fresh_statistics"


def _fresh_norm_hook(module: nn.Module, args: Tuple[torch.Tensor, ...], output: torch.Tensor) -> Optional[torch.Tensor]:
    """Eval-mode output of a BatchNorm that has no statistics yet: normalised with the batch's own."""
    if not getattr(module, FRESH_ATTR, False) or module.num_batches_tracked.is_meta:
        return None
    x = args[0]
    if is_exporting():
        # Buffers hold no values while exporting: the flag alone decides (a forward in training mode or a loaded
        # state dict clears it). The graph keeps both normalisations and picks one per call, as eager does.
        if module.training:
            return None
        single = torch.ones_like(x[:, 0]).sum() == 1  # one value per channel: batch statistics are undefined
        return torch.where(single, output, F.batch_norm(x, None, None, module.weight, module.bias, True, 0.0,
                                                        module.eps))
    if module.training or int(module.num_batches_tracked) != 0:  # trained, or statistics copied in (EMA)
        setattr(module, FRESH_ATTR, False)
        return None
    if x.numel() == x.shape[1]:  # one value per channel: batch statistics are undefined
        return None
    return F.batch_norm(x, None, None, module.weight, module.bias, True, 0.0, module.eps)


def _loaded_norm_hook(module: nn.Module, *args: Any) -> None:
    setattr(module, FRESH_ATTR, False)  # a state dict brings statistics (even one without num_batches_tracked)


def use_batch_statistics_until_trained(model: nn.Module) -> int:
    """Until they have seen a training batch or a state dict, ``model``'s BatchNorms normalise with the
    batch's own statistics in eval mode too; returns how many BatchNorms were set up.

    DCD (``P Phi(x) Q^T x``) and DGC (``conv(x * g(x))``) multiply by their input, so with the initial
    running statistics (mean 0, variance 1) a fresh ResNet's eval-mode activations square at every
    block: about 1e3 after layer1, inf/NaN by layer2 (timm's smoke test runs a fresh model in eval). The
    official models (liyunsheng13/dcd ``models/imagenet/resnet_dcd.py``: convs normal(0, sqrt(2/n)),
    BatchNorm weight 1, bias 0; zhuogege1943/dgc ``models/dynamic_resnet.py``: kaiming fan_out, BatchNorm
    1/0) do the same. Filling the running statistics from one synthetic batch is not enough: any other
    input, or another resolution, differs a little from it, and the squaring turns that into inf again.
    Parameters, training mode and trained or loaded models are unaffected; the check costs one read
    of ``num_batches_tracked`` per BatchNorm and eval forward, only while a BatchNorm is still fresh.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            setattr(module, FRESH_ATTR, True)
            module.register_forward_hook(_fresh_norm_hook)
            module._register_load_state_dict_pre_hook(_loaded_norm_hook, with_module=True)
            count += 1
    return count
