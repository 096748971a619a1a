"""Loss terms that layers contribute on top of the task loss (DGC's group lasso).

The mechanism is general and leaves every backbone's ``forward`` untouched: a layer with a loss
term stores it, already weighted, in its ``auxiliary_loss`` attribute during each training-mode
forward (``None`` otherwise), and :func:`auxiliary_loss` sums what the layers recorded in the
model's last forward. A training step is then::

    logits = model(images)
    loss = criterion(logits, targets) + dynconv.auxiliary_loss(model)

The official DGC code instead threads a list of lasso terms through a changed forward signature
(``forward(x, progress) -> (logits, lasso_list)``) and adds ``lambda * sum(lasso_list)``; the total
is the same.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn


def auxiliary_terms(model: nn.Module) -> List[torch.Tensor]:
    """The weighted terms recorded by the layers of ``model`` in its last training-mode forward."""
    terms = []
    for module in model.modules():
        term = getattr(module, "auxiliary_loss", None)
        if isinstance(term, torch.Tensor):
            terms.append(term)
    return terms


def auxiliary_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the auxiliary loss terms of ``model``'s last forward; a zero scalar if there are none.

    Call it after the forward whose terms you want and before the next one (each forward
    overwrites the terms). Eval-mode forwards record nothing.
    """
    terms = auxiliary_terms(model)
    if not terms:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return torch.stack([t.to(terms[0].dtype) for t in terms]).sum()
