"""The autograd functions of adapted layers: the frozen layer and its low-rank update as one op, the low-rank
output added in one op for inference, and the guard that refuses backward through a merged adapter."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LowRankLinear", "MergedGuard", "add_low_rank_output"]

# Rows of the activation recomputed per step in backward: about 1 MiB of float32, so the pre-activation block,
# its recomputed output and its gradient stay in a core's cache between the three passes that use them.
_ACTIVATION_BLOCK_ELEMENTS = 1 << 18


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


class LowRankLinear(torch.autograd.Function):
    """``act(x) Wᵀ + bias + (act(x) A) B`` for a frozen ``W`` and ``bias``, with one buffer per output and gradient.

    The low-rank output is added into the frozen layer's output in place, and backward writes the input gradient
    once (``grad W + (grad Bᵀ) Aᵀ`` into one buffer) instead of two gradients and their sum. Only ``x``, ``x A``
    and the factors are kept: never a cast copy of ``W`` under autocast (it is cast again in backward).

    ``activation`` is an ``mlp.act`` that an adapted ``mlp.fc2`` took over (``AdaptedLinear.input_activation``):
    then ``x`` is the pre-activation, which a frozen model keeps for the activation's backward anyway, and the
    activation output (four times wider for ViT MLPs) is never kept. Backward recomputes it a cache-sized block
    of rows at a time: the same block gives A's gradient and the activation's gradient, written into the input
    gradient in place, so an adapted ``fc2`` keeps nothing that the frozen MLP does not keep already.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor, activation: Optional[nn.Module]
    ) -> Tensor:
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise ValueError("LowRankLinear trains x, A and B only: freeze the weight and bias (requires_grad=False) "
                             "or use F.linear plus the low-rank term")
        inputs = x if activation is None else activation(x)
        y = F.linear(inputs, weight, bias)
        xa = inputs @ a.to(inputs.dtype)
        y.view(-1, y.shape[-1]).addmm_(xa.reshape(-1, xa.shape[-1]).to(y.dtype), b.to(y.dtype))
        keep_x = ctx.needs_input_grad[3] or (activation is not None and ctx.needs_input_grad[0])
        ctx.activation, ctx.input_shape = activation, x.shape
        ctx.save_for_backward(x if keep_x else None, weight, xa, a, b)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight, xa, a, b = ctx.saved_tensors
        needs_x, needs_a, needs_b = (ctx.needs_input_grad[i] for i in (0, 3, 4))
        dtype = grad.dtype
        grad = grad.reshape(-1, grad.shape[-1])
        a_, b_ = a.to(dtype), b.to(dtype)
        grad_xa = grad @ b_.t()
        grad_b = xa.reshape(-1, xa.shape[-1]).to(dtype).t() @ grad if needs_b else None
        grad_x = None
        if needs_x:
            grad_x = grad @ weight.to(dtype)
            grad_x.addmm_(grad_xa, a_.t())
        grad_a = None
        if ctx.activation is not None and (needs_x or needs_a):
            grad_a = _activation_backward(ctx.activation, x.reshape(-1, x.shape[-1]), grad_x, grad_xa, needs_a)
        elif needs_a:
            grad_a = x.reshape(-1, x.shape[-1]).to(dtype).t() @ grad_xa
        if grad_x is not None:
            grad_x = grad_x.view(ctx.input_shape)
        grad_a = grad_a.to(a.dtype) if grad_a is not None else None
        grad_b = grad_b.to(b.dtype) if grad_b is not None else None
        return grad_x, None, None, grad_a, grad_b, None


def _gelu_backward(activation: nn.GELU, grad: Tensor, h: Tensor) -> Tensor:
    return torch.ops.aten.gelu_backward(grad, h, approximate=activation.approximate)


# Activations whose backward is one op: a vjp per block costs more than the block's arithmetic (timm ViTs: GELU).
_ACTIVATION_BACKWARD = {nn.GELU: _gelu_backward}


def _activation_backward(activation: nn.Module, h: Tensor, grad_x: Optional[Tensor], grad_xa: Tensor,
                         needs_a: bool) -> Optional[Tensor]:
    """A's gradient ``act(h)ᵀ grad_xa``, and ``grad_x`` turned into the pre-activation's gradient in place.

    One block of rows at a time: the recomputed activation output of a block is used for A's gradient and for
    the activation's own backward while it is still in cache, and never exists for all rows at once.
    """
    forward = activation.forward  # a recomputation: the module's hooks ran in the forward pass already
    backward = _ACTIVATION_BACKWARD.get(type(activation))
    rows = max(1, _ACTIVATION_BLOCK_ELEMENTS // h.shape[-1])
    grad_a = torch.zeros(h.shape[-1], grad_xa.shape[-1], dtype=grad_xa.dtype, device=h.device) if needs_a else None
    for start in range(0, h.shape[0], rows):
        block = slice(start, start + rows)
        if backward is None and grad_x is not None:
            x_block, activation_vjp = torch.func.vjp(forward, h[block])
            (grad_x[block],) = activation_vjp(grad_x[block])
        else:
            x_block = forward(h[block]) if grad_a is not None else None
            if grad_x is not None:
                grad_x[block] = backward(activation, grad_x[block], h[block])
        if grad_a is not None:
            grad_a.addmm_(x_block.to(grad_xa.dtype).t(), grad_xa[block])
    return grad_a
