"""The autograd functions of adapted layers: the low-rank output added in one op, its recomputed-input variant,
and the guard that refuses backward through a merged adapter."""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MergedGuard", "RecomputedInputDelta", "add_low_rank_output"]


class MergedGuard(torch.autograd.Function):
    """Identity on a merged layer's output whose backward raises: its adapter would silently get no gradient."""

    @staticmethod
    def forward(ctx, y: Tensor, *adapter_parameters: Tensor) -> Tensor:  # type: ignore[override]
        return y.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        raise RuntimeError(
            "backward through a merged adapter: its ΔW is folded into the frozen weight, so its adapter parameters "
            "would get no gradient. Call nv.unmerge(model) before training (for inference, use torch.no_grad())"
        )


def add_low_rank_output(y: Tensor, xa: Tensor, b: Tensor) -> Tensor:
    """y + xa @ b as one addmm: the low-rank output is never written and read back separately."""
    out = torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), b.to(xa.dtype))
    return out.view(y.shape)


class RecomputedInputDelta(torch.autograd.Function):
    """``y + (x A) B`` for x = act(h) that keeps h (already kept by the activation's own backward), not x.

    An adapted ``mlp.fc2`` needs its input for the gradient of A; a frozen model never stores that
    activation output, so recomputing it in backward keeps NOLA-MLP's memory at LoRA's level. The gradient
    for x joins the frozen path's before the activation's backward, which then runs once.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, y: Tensor, x: Tensor, h: Tensor, a: Tensor, b: Tensor, activation: nn.Module
    ) -> Tensor:
        ctx.activation = activation
        ctx.save_for_backward(h, a, b)
        return add_low_rank_output(y, x @ a.to(x.dtype), b)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        h, a, b = ctx.saved_tensors
        dtype = grad.dtype
        a_, b_ = a.to(dtype), b.to(dtype)
        grad_xa = grad @ b_.t()
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            with torch.no_grad():
                x = ctx.activation(h).to(dtype)
            if ctx.needs_input_grad[3]:
                grad_a = (x.flatten(0, -2).t() @ grad_xa.flatten(0, -2)).to(a.dtype)
            if ctx.needs_input_grad[4]:
                grad_b = ((x @ a_).flatten(0, -2).t() @ grad.flatten(0, -2)).to(b.dtype)
        if ctx.needs_input_grad[1]:
            grad_x = grad_xa @ a_.t()
        return grad, grad_x, None, grad_a, grad_b, None
