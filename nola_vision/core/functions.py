"""The autograd functions of adapted layers: the frozen layer and its low-rank update as one op, the low-rank
output added in one op for inference, and the guard that refuses backward through a merged adapter."""
from __future__ import annotations

import weakref
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

__all__ = ["LowRankLinear", "MergedGuard", "MergedTangentGuard", "add_low_rank_output", "autocast_available",
           "autocast_dtype", "cast_to", "is_batched", "launch_bound", "low_rank_linear", "product_dtype",
           "transforms_active"]

# Rows of the activation recomputed per step in backward: about 2 MiB of float32, so the pre-activation block,
# its recomputed output and its gradient stay in a core's cache between the passes that use them.
_ACTIVATION_BLOCK_ELEMENTS = 1 << 19
# On accelerators a block buys no cache locality and costs kernel launches (a GPU step was launch-bound at 2 MiB):
# blocks of 8M elements (16 MiB in bf16) keep the launches few and the recomputed activation small beside a batch's.
_ACCELERATOR_BLOCK_ELEMENTS = 1 << 23


def launch_bound(device: torch.device) -> bool:
    """Whether small ops on ``device`` cost their kernel launches more than their memory traffic: every device but the
    CPU. Block and chunk sizes, and whether a training pass holds the shared bases, follow from it (one place, so a
    benchmark can measure an accelerator's choices on the CPU: ``benchmarks/launch_bound.py``)."""
    return device.type != "cpu"


def is_batched(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a batched stand-in: ``torch.func.vmap``'s, or the one a batched backward runs on
    (``autograd.grad(is_grads_batched=True)``, ``jacobian(vectorize=True)``)."""
    functorch = torch._C._functorch
    return any(bool(getattr(functorch, name, lambda _: False)(tensor))
               for name in ("is_batchedtensor", "is_legacy_batchedtensor"))


def transforms_active() -> bool:
    """Whether ``torch.func`` transforms (grad, vmap, jacrev) or forward-mode AD (``torch.autograd.forward_ad``'s
    dual tensors) run this code: they need plain differentiable ops, not this module's autograd functions, which keep
    state on their nodes and define no forward derivative."""
    functorch = bool(getattr(torch._C, "_are_functorch_transforms_active", lambda: False)())
    return functorch or getattr(forward_ad, "_current_level", -1) >= 0


class MergedGuard(torch.autograd.Function):
    """Identity on a merged layer's output whose backward raises: its adapter would silently get no gradient."""

    generate_vmap_rule = True  # as torch.func transforms require (with setup_context)

    @staticmethod
    def forward(y: Tensor, *adapter_parameters: Tensor) -> Tensor:  # type: ignore[override]
        return y.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Tensor, ...], output: Tensor) -> None:  # type: ignore[override]
        ctx.adapter_parameters = [(p.shape, p.dtype) for p in inputs[1:]]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:  # type: ignore[override]
        if not torch.compiler.is_compiling():
            if any(ctx.needs_input_grad[1:]):
                raise RuntimeError(_MERGED_BACKWARD)
            return (grad, *([None] * len(ctx.adapter_parameters)))  # (torch.func.grad of the input alone)
        # traced, by an operator that raises when the backward runs: a raise here ended dynamo's trace of the forward.
        # The adapter's gradients come from it too: a backward that needs no input gradient (an input without
        # requires_grad) would otherwise drop the operator and finish, leaving the adapter without gradients.
        refused = _refuse_merged_backward(grad)
        total = refused.sum()
        return (refused, *(total.to(dtype).expand(shape) for shape, dtype in ctx.adapter_parameters))


class MergedTangentGuard(MergedGuard):
    """``MergedGuard`` with forward-mode derivatives, for torch.func transforms and dual tensors
    (``transforms_active``): dynamo traces no function that defines them, so compiled passes take ``MergedGuard``."""

    @staticmethod
    def jvp(ctx: Any, y_tangent: Optional[Tensor], *tangents: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        """Forward-mode derivatives (dual tensors, ``torch.func.jvp``): the input's pass through; an adapter tensor's
        tangent is refused, the merged weight holding none of it (torch gives zeros for tensors without one)."""
        if y_tangent is None or any(t is not None and _nonzero(t) for t in tangents):
            raise RuntimeError(_MERGED_FORWARD_DERIVATIVE)
        return y_tangent.clone()


def _nonzero(tangent: Tensor) -> bool:
    """Whether a tangent holds a value other than zero; under vmap (jacfwd's batched tangents) its values cannot be
    read, and it is taken as one that does."""
    try:
        return bool(tangent.any())
    except RuntimeError:
        return True


_MERGED_FORWARD_DERIVATIVE = (
    "forward-mode derivative along a merged adapter's parameters: its ΔW is folded into the frozen weight, so their "
    "tangents would be silently ignored. Call nv.unmerge(model) first")
_MERGED_BACKWARD = ("backward through a merged adapter: its ΔW is folded into the frozen weight, so its adapter "
                    "parameters would get no gradient. Call nv.unmerge(model) before training or taking gradients of "
                    "the input (saliency maps); for inference, use torch.no_grad()")


@torch.library.custom_op("nola_vision::refuse_merged_backward", mutates_args=())
def _refuse_merged_backward(grad: Tensor) -> Tensor:
    """The gradient through a merged layer, in a compiled graph: refused when it runs."""
    raise RuntimeError(_MERGED_BACKWARD)


@_refuse_merged_backward.register_fake
def _(grad: Tensor) -> Tensor:
    """Its shape, for tracing."""
    return torch.empty_like(grad)


def add_low_rank_output(y: Tensor, xa: Tensor, b: Tensor) -> Tensor:
    """y + xa @ b as one addmm: the low-rank output is never written and read back separately."""
    out = torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), cast_to(b, xa.dtype))
    return out.view(y.shape)


class LowRankLinear(torch.autograd.Function):
    """The training node of ``act(x) Wᵀ + bias + (act(x) A) B`` for a frozen ``W`` and ``bias``: it keeps what
    backward needs and computes every gradient, with one buffer per output and gradient.

    Backward writes the input gradient once (``grad W + (grad Bᵀ) Aᵀ`` into one buffer) instead of two gradients
    and their sum. Only ``x``, ``x A`` and the factors are kept: never a cast copy of ``W`` under autocast (it is
    cast again in backward). Its forward computes only ``act(x)`` and ``act(x) A`` and returns a zero-size-in-memory
    ``sink``; the frozen product runs after it in ``_FrozenProduct``, which keeps nothing and hands its output
    gradient back through the sink. So when gradient checkpointing recomputes a block, torch stops the recomputation
    as soon as this node has kept its tensors, as it stops before a frozen ``nn.Linear``'s product: an adapted
    ``fc2``'s product is never recomputed. (Launch-bound devices take one node, ``_FusedLowRankLinear``, where no
    saved-tensor hooks run.)

    ``activation`` is an ``mlp.act`` that an adapted ``mlp.fc2`` took over (``AdaptedLinear.input_activation``):
    then ``x`` is the pre-activation, which a frozen model keeps for the activation's backward anyway, and the
    activation output (four times wider for ViT MLPs) is never kept. Backward recomputes it a cache-sized block
    of rows at a time: the same block gives A's gradient and the activation's gradient, written into the input
    gradient in place, so an adapted ``fc2`` keeps nothing that the frozen MLP does not keep already.

    ``producer`` is the node of an adapted ``fc1`` whose output ``x`` is (``_producer``): the same blocks, once they
    hold ``x``'s gradient, also give that ``fc1``'s ``x A`` and B gradients (``_InputLayerGradients``), so its
    backward does not read the MLP-wide gradient twice more for them.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor, activation: Optional[nn.Module],
        producer: Optional[Any] = None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        inputs, xa = _keep_for_backward(ctx, x, weight, a, b, activation, producer)
        ctx.mark_non_differentiable(inputs, xa)
        # Shaped as the output; its gradient arrives in the product's dtype, as autocast (if on) chooses it for F.linear
        sink = _sink(product_dtype(inputs), x.device).expand(*x.shape[:-1], weight.shape[0])
        return inputs, xa, sink

    @staticmethod
    def backward(ctx: Any, grad_inputs: Optional[Tensor], grad_xa: Optional[Tensor],  # type: ignore[override]
                 grad: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
        return (*_gradients(ctx, grad), None)


class _FusedLowRankLinear(torch.autograd.Function):
    """``LowRankLinear`` and ``_FrozenProduct`` as one node, for launch-bound devices where no saved-tensor hooks run
    (gradient checkpointing's): there nothing recomputes the layer, so the split buys nothing and costs the host a
    node in forward and in backward per layer and step."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor,  # type: ignore[override]
                activation: Optional[nn.Module]) -> Tensor:
        inputs, xa = _keep_for_backward(ctx, x, weight, a, b, activation, None)
        return _shaped(_product(inputs, weight, bias, xa, b), (*x.shape[:-1], weight.shape[0]))

    @staticmethod
    def backward(ctx, grad: Optional[Tensor]):  # type: ignore[override]
        return _gradients(ctx, grad)


def _keep_for_backward(ctx, x: Tensor, weight: Tensor, a: Tensor, b: Tensor, activation: Optional[nn.Module],
                       producer: Optional[Any]) -> Tuple[Tensor, Tensor]:
    """``act(x)`` and ``act(x) A`` as 2-d rows, keeping on ``ctx`` what ``_gradients`` needs (see ``LowRankLinear``)."""
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise _trainable_weight_error()
    # Where the product reads x itself (no activation, no cast), it gets a fresh alias: a Function may not return
    # its input (nor a view autograd would tie to it).
    aliases_x = activation is None and (not launch_bound(x.device) or product_dtype(x) == x.dtype)
    inputs, xa = _adapter_input(x.detach() if aliases_x else x, a, activation, flat=True)
    ctx.activation, ctx.producer, ctx.precomputed = activation, producer, None
    # x itself, to see in backward whether hooks were registered on it (they may change its gradient).
    ctx.producer_output = weakref.ref(x) if producer is not None else None
    # For an adapted fc2 after this layer (plain references: fc2's backward must not unpack this node's saved
    # tensors, which gradient checkpointing allows once); both are kept in save_for_backward anyway.
    ctx.fusable = (xa, b) if activation is None else None
    ctx.save_for_backward(_kept_input(ctx, x, activation is not None), weight, xa, a, b)
    ctx.set_materialize_grads(False)
    return inputs, xa


def _gradients(ctx, grad: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """The gradients of the inputs ``_keep_for_backward`` kept for (x, weight, bias, A, B, activation) from the
    output gradient ``grad``."""
    precomputed, ctx.precomputed = ctx.precomputed, None
    if grad is None:  # the product's output got no gradient
        return None, None, None, None, None, None
    needs = ctx.needs_input_grad
    x, weight, xa, a, b = ctx.saved_tensors
    # backward(create_graph=True): gradients that can be differentiated again; a batched backward (jacobian's
    # vectorize, is_grads_batched) runs under vmap, which has no rule for the in-place and out= ops below
    if torch.is_grad_enabled() or is_batched(grad):
        grad_x, grad_a, grad_b = _differentiable_backward(grad, x, weight, xa, a, b, ctx.activation, needs[0],
                                                          needs[3], needs[4])
        return grad_x, None, None, grad_a, grad_b, None
    producer = _InputLayerGradients.of(ctx.producer, ctx.producer_output, grad) if needs[0] else None
    grad_x, grad_a, grad_b = _backward(
        grad, x, weight, xa, a, b, ctx.activation, needs[0], needs[3], needs[4],
        precomputed=precomputed.of_gradient(grad) if precomputed is not None else None, producer=producer)
    if producer is not None and grad_x is not None:
        producer.hand_over(ctx.producer, grad_x)
    return grad_x, None, None, grad_a, grad_b, None


def _sink(dtype: torch.dtype, device: torch.device) -> Tensor:
    """A one-value tensor that is never read (uninitialised: no fill kernel), expanded to an output's shape as the
    sink; one per dtype and device, made once (an allocation per layer and step is a host cost on accelerators)."""
    if torch.compiler.is_compiling() or _fake_mode():  # a fake pass takes (and leaves) no real tensor
        return torch.empty((), dtype=dtype, device=device)
    sink = _SINKS.get((dtype, device))
    if sink is None:
        sink = _SINKS[(dtype, device)] = torch.empty((), dtype=dtype, device=device)
    return sink


def _fake_mode() -> bool:
    """Whether a FakeTensorMode (shape propagation, export, memory estimates) runs this code."""
    key = getattr(getattr(torch._C, "_TorchDispatchModeKey", None), "FAKE", None)
    return key is not None and torch._C._get_dispatch_mode(key) is not None


_SINKS: Dict[Tuple[torch.dtype, torch.device], Tensor] = {}


class _FrozenProduct(torch.autograd.Function):
    """``inputs Wᵀ + bias + xa B`` (autocast as ambient) shaped as the sink, keeping nothing: its gradient goes to
    ``LowRankLinear`` through the sink, whose backward computes every gradient."""

    @staticmethod
    def forward(ctx, inputs: Tensor, weight: Tensor, bias: Optional[Tensor], xa: Tensor, b: Tensor,  # type: ignore[override]
                sink: Tensor) -> Tensor:
        return _shaped(_product(inputs, weight, bias, xa, b), sink.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return None, None, None, None, None, grad


def low_rank_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor,
                    activation: Optional[nn.Module]) -> Tensor:
    """``LowRankLinear`` for a training forward pass; under ``torch.compile``, one opaque operator.

    Traced into a graph, the compiler would choose what to keep for backward itself (and keeps more than these
    few tensors); as an operator it keeps exactly what eager keeps, so a compiled step's peak is eager's.
    Activations other than GELU are traced as before.
    """
    if torch.compiler.is_compiling() and (activation is None or type(activation) is nn.GELU):
        if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
            raise _trainable_weight_error()
        return _low_rank_linear_op(x, weight, bias, a, b, _gelu_name(activation), product_dtype(x))[0]
    if launch_bound(x.device):
        if not (torch.compiler.is_compiling() or _saved_tensor_hooks()):
            return _FusedLowRankLinear.apply(x, weight, bias, a, b, activation)
        producer = None  # computing fc1's gradients inside fc2's cache-sized blocks saves memory traffic, not launches
    else:
        producer = _producer(x) if activation is not None else None
    inputs, xa, sink = LowRankLinear.apply(x, weight, bias, a, b, activation, producer)
    return _FrozenProduct.apply(inputs, weight, bias, xa, b, sink)


def _saved_tensor_hooks() -> bool:
    """Whether saved-tensor hooks run (gradient checkpointing's, offloading's), or cannot be told (older torch)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _producer(x: Tensor) -> Optional[Any]:
    """The ``LowRankLinear`` node of the adapted layer whose output ``x`` is (its ``_FrozenProduct``'s output, which
    gets its gradient through that node's sink), or None."""
    node = x.grad_fn
    if type(node) is not _FrozenProduct._backward_cls:
        return None
    for producer, _ in node.next_functions:  # the sink's node; the other inputs are not differentiable or leaves
        if type(producer) is LowRankLinear._backward_cls:
            return producer if producer.fusable is not None else None
    return None


class _InputLayerGradients:
    """An adapted ``fc1``'s ``x A`` and B gradients (``grad Bᵀ`` and ``(x A)ᵀ grad`` for its output gradient
    ``grad``), computed by the adapted ``fc2`` after it, a block of rows at a time while each block of ``grad`` is
    in cache (``add``). ``fc1``'s backward takes them only for the very tensor they were computed from, unchanged
    (``of_gradient``): where anything else reaches that gradient (another use of ``fc1``'s output, a hook), it
    computes them itself."""

    def __init__(self, xa: Tensor, b: Tensor, needs_b: bool, dtype: torch.dtype) -> None:
        self.xa = cast_to(xa.reshape(-1, xa.shape[-1]), dtype)
        self.b_t = cast_to(b, dtype).t()
        self.grad_xa = torch.empty(self.xa.shape, dtype=dtype, device=xa.device)
        # Summed over blocks in float32 at least, as one product would accumulate it.
        sum_dtype = torch.promote_types(dtype, torch.float32)
        self.grad_b = torch.zeros(b.shape, dtype=sum_dtype, device=b.device) if needs_b else None
        self.grad: Optional[weakref.ref] = None
        self.version = -1

    @classmethod
    def of(cls, producer: Optional[Any], output: Optional[weakref.ref], grad: Tensor
           ) -> Optional[_InputLayerGradients]:
        """The gradients to compute for ``producer`` (a ``LowRankLinear`` node) from a ``grad`` of this dtype, or
        None: also where its ``output`` is gone or has hooks, which may change the gradient without a trace (through
        ``.data``)."""
        if producer is None or not any(producer.needs_input_grad[i] for i in (0, 3, 4)):
            return None
        tensor = output() if output is not None else None
        if tensor is None or tensor._backward_hooks:
            return None
        xa, b = producer.fusable
        return cls(xa, b, producer.needs_input_grad[4], grad.dtype)

    def add(self, start: int, grad_block: Tensor) -> None:
        """Take the block of rows of the output gradient that starts at ``start``."""
        rows = slice(start, start + grad_block.shape[0])
        torch.mm(grad_block, self.b_t, out=self.grad_xa[rows])
        if self.grad_b is None:
            return
        if self.grad_b.dtype == grad_block.dtype:
            self.grad_b.addmm_(self.xa[rows].t(), grad_block)
        else:
            self.grad_b += self.xa[rows].t() @ grad_block

    def hand_over(self, producer: Any, grad: Tensor) -> None:
        """Leave these gradients for ``producer``'s backward, tied to ``grad`` (the output gradient it should get)
        without keeping it alive, until the end of this backward pass (where it never runs, they are dropped)."""
        self.grad, self.version = weakref.ref(grad), grad._version
        producer.precomputed = self

        def drop() -> None:
            if producer.precomputed is self:
                producer.precomputed = None

        torch.autograd.Variable._execution_engine.queue_callback(drop)

    def of_gradient(self, grad: Tensor) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
        """``(grad_xa, grad_b)`` if ``grad`` is the very tensor they were computed from, unchanged; else None."""
        if self.grad is None or grad is not self.grad() or grad._version != self.version:
            return None
        return self.grad_xa, self.grad_b.to(grad.dtype) if self.grad_b is not None else None


def autocast_available(device_type: str) -> bool:
    """Whether torch has autocast for ``device_type`` (cpu, cuda, mps, xpu...; not meta), where asking whether it is
    on would raise. Kept in a plain dict, which torch.compile traces (it warned of every ``functools.cache``), filled
    at import for the usual devices: one filled inside a compiled call made the next call compile again."""
    available = _AUTOCAST_AVAILABLE.get(device_type)
    if available is None:
        available = _AUTOCAST_AVAILABLE[device_type] = _ask_autocast_available(device_type)
    return available


def _ask_autocast_available(device_type: str) -> bool:
    is_available = getattr(torch.amp, "is_autocast_available", lambda kind: kind in ("cpu", "cuda"))
    return bool(is_available(device_type))


_AUTOCAST_AVAILABLE: Dict[str, bool] = {kind: _ask_autocast_available(kind) for kind in ("cpu", "cuda", "meta")}


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast casts ``F.linear``'s float32 inputs to on ``device``, or None where it is off."""
    kind = device.type
    return torch.get_autocast_dtype(kind) if autocast_available(kind) and torch.is_autocast_enabled(kind) else None


def product_dtype(inputs: Tensor) -> torch.dtype:
    """The dtype autocast (if on) gives ``F.linear`` of ``inputs``: its lower precision for float32, float16 and
    bfloat16 inputs; float64 and every other dtype are left as they are (and on devices without autocast: meta)."""
    autocast = autocast_dtype(inputs.device)
    if autocast is not None and inputs.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return autocast
    return inputs.dtype


def _trainable_weight_error() -> ValueError:
    return ValueError("LowRankLinear trains x, A and B only: freeze the weight and bias (requires_grad=False) "
                      "or use F.linear plus the low-rank term")


def _kept_input(ctx, x: Tensor, has_activation: bool) -> Optional[Tensor]:
    """``x`` if backward needs it: for A's gradient, for the taken-over activation's gradient of ``x``, or for
    B's gradient as a function of ``x`` (a double backward differentiates it)."""
    needs_x, needs_a, needs_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    return x if needs_a or (needs_x and (has_activation or needs_b)) else None


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor,
             activation: Optional[nn.Module], dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor]:
    """The output and ``x A``; in ``dtype`` when given (what autocast would choose), else as the ambient autocast.

    The compiled operator's body. With a taken-over activation it runs on half the rows at a time, so the
    activation output (as wide as the MLP) exists for half the rows only: at the end of a compiled forward pass,
    where the last block's ``fc2`` product sits at the step's memory peak, this frees more than the compiler
    keeps beyond eager (it fuses each residual addition into the next layer norm, so one addend lives longer).
    """
    if activation is None:  # on the CPU x as it is: the product casts it, as under eager autocast (``_joined_product``)
        inputs, xa = _adapter_input(x, a, None, dtype)
        return _product(inputs if launch_bound(x.device) else x, weight, bias, xa, b, dtype), xa
    if dtype is not None:
        weight, bias = cast_to(weight, dtype), cast_to(bias, dtype) if bias is not None else None
    if x.dim() < 2 or x.numel() == 0:
        inputs, xa = _adapter_input(x, a, activation, dtype)
        return _product(inputs, weight, bias, xa, b), xa
    h = x.reshape(-1, x.shape[-1])
    part = -(-h.shape[0] // 2)
    y, xas = h.new_empty((h.shape[0], weight.shape[0]), dtype=dtype or h.dtype), []
    for start in range(0, h.shape[0], part):
        inputs, xa = _adapter_input(h[start : start + part], a, activation, dtype)
        _product(inputs, weight, bias, xa, b, out=y[start : start + part])
        xas.append(xa)
        del inputs
    xa = torch.cat(xas)
    return y.view(*x.shape[:-1], y.shape[-1]), xa.view(*x.shape[:-1], xa.shape[-1])


def _adapter_input(x: Tensor, a: Tensor, activation: Optional[nn.Module],
                   dtype: Optional[torch.dtype] = None, flat: bool = False) -> Tuple[Tensor, Tensor]:
    """``act(x)`` (in ``dtype`` when given) and ``act(x) A``, shaped as ``x`` or (``flat``) as 2-d rows.

    On the CPU, A is handed to the product as the transpose of a row-major (rank, in) copy: each output is then a dot
    product of two contiguous rows, 2-4x faster than reading a contiguous (in, rank) A four values to a row. An
    activation with an out op (GELU) is applied a cache-sized block of rows at a time, each block multiplied by A
    while it is in cache: the activation output (as wide as the MLP) is written once and not read back for ``x A``.
    On launch-bound devices ``act(x)`` comes in the product's dtype (as autocast would cast it), so the product does
    not cast it again, and rows that fit one block are not split.
    """
    if launch_bound(x.device):  # x cast once, for x A and for the product
        a_t, dtype = a, dtype or product_dtype(x)
    else:
        a_t = a.t().contiguous().t()
    if (activation is None or type(activation) not in _ACTIVATION_OPS or x.dim() < 2 or x.numel() == 0
            or _one_launch_bound_block(x)):
        inputs = x if activation is None else activation(x)
        if dtype is not None:
            inputs = cast_to(inputs, dtype)
        if flat:
            inputs = _rows(inputs)
        return inputs, inputs @ cast_to(a_t, product_dtype(inputs))  # as autocast (if on) would cast it
    forward_out = _ACTIVATION_OPS[type(activation)][0]
    h = x.reshape(-1, x.shape[-1])
    rows = _block_rows(h)
    inputs = torch.empty(h.shape, dtype=dtype or h.dtype, device=h.device)
    # In another dtype, each block is activated into one reused buffer, then cast into its rows of ``inputs``.
    cast = inputs.dtype != h.dtype
    buffer = torch.empty(min(rows, h.shape[0]), h.shape[1], dtype=h.dtype, device=h.device) if cast else None
    a_t = cast_to(a_t, inputs.dtype)
    xas = []
    for start in range(0, h.shape[0], rows):
        h_block, block = h[start : start + rows], inputs[start : start + rows]
        if cast:
            block.copy_(forward_out(activation, h_block, buffer[: h_block.shape[0]]))
        else:
            forward_out(activation, h_block, block)
        xas.append(block @ a_t)
    xa = torch.cat(xas) if len(xas) > 1 else xas[0]
    if flat:
        return inputs, xa
    return inputs.view(*x.shape[:-1], h.shape[-1]), xa.view(*x.shape[:-1], xa.shape[-1])


def cast_to(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)``, without the call where it has that dtype already (a no-op ``to`` still costs the host
    about 3 µs, a dozen times per layer and step)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _rows(tensor: Tensor) -> Tensor:
    """``tensor`` as 2-d rows: itself when it is 2-d already (a reshape would still dispatch a view)."""
    return tensor if tensor.dim() == 2 else tensor.reshape(-1, tensor.shape[-1])


def _one_launch_bound_block(h: Tensor) -> bool:
    """Whether ``h``'s rows make one block on a launch-bound device: then the blocks' slices, buffers and accumulators
    are dispatches (and zeroing kernels) the host pays for and nothing gains."""
    return launch_bound(h.device) and _block_rows(h) >= h.numel() // max(1, h.shape[-1])


def _block_rows(h: Tensor) -> int:
    """Rows of a block of the 2-d ``h``: cache-sized on the CPU, launch-sized elsewhere (``_ACTIVATION_BLOCK_ELEMENTS``,
    ``_ACCELERATOR_BLOCK_ELEMENTS``)."""
    elements = _ACCELERATOR_BLOCK_ELEMENTS if launch_bound(h.device) else _ACTIVATION_BLOCK_ELEMENTS
    return max(1, elements // max(1, h.shape[-1]))


def _product(inputs: Tensor, weight: Tensor, bias: Optional[Tensor], xa: Tensor, b: Tensor,
             dtype: Optional[torch.dtype] = None, out: Optional[Tensor] = None) -> Tensor:
    """``inputs Wᵀ + bias + xa B``: one rank-(r+1) product writes ``xa B + bias`` (the bias as a row of B against
    a column of ones), then the frozen product accumulates onto it, so the output is written once and read once
    instead of being filled with the bias, written by the product and read and written again by the update.

    The result is not a view autograd tracks (as ``matmul``'s is not), so an in-place op after the layer (a
    ``ReLU(inplace=True)``, ``qkv += bias``) works; ``F.linear`` on a 3-d input would return one. ``dtype``: the
    product's (default: as autocast chooses); ``out``: the 2-d rows to write instead (``_forward``'s row parts).
    Where ``inputs`` and ``W`` must both be cast, ``_joined_product`` computes it instead.
    """
    dtype = dtype or product_dtype(inputs)
    rows, xa_rows = _rows(inputs), _rows(xa)
    if launch_bound(inputs.device):
        y = _few_launch_product(rows, weight, bias, xa_rows, b, dtype, out)
    elif inputs.dtype != dtype and weight.dtype != dtype:
        y = _joined_product(rows, weight, xa_rows, b.t(), bias, dtype, out)
    else:
        left, right = cast_to(xa_rows, dtype), cast_to(b, dtype)
        if bias is not None:
            left = torch.cat([left, left.new_ones(left.shape[0], 1)], dim=1)
            right = torch.cat([right, cast_to(bias, dtype).unsqueeze(0)])
        y = torch.mm(left, right, out=out) if out is not None else torch.mm(left, right)
        y.addmm_(cast_to(rows, dtype), cast_to(weight, dtype).t())
    return out if out is not None else _shaped(y, (*inputs.shape[:-1], y.shape[-1]))


def _shaped(y: Tensor, shape: Tuple[int, ...]) -> Tensor:
    """The product's rows ``y`` in ``shape``: as they are where it is theirs, else as a tensor that is no view autograd
    tracks (as ``matmul``'s is not), so an in-place op after the layer works."""
    return y if y.shape == shape else torch.ops.aten._unsafe_view(y, shape)


def _few_launch_product(rows: Tensor, weight: Tensor, bias: Optional[Tensor], xa: Tensor, b: Tensor,
                        dtype: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
    """``rows Wᵀ + bias + xa B`` in ``dtype`` for 2-d ``rows`` and ``xa`` in the fewest kernels, for devices where each
    launch costs more than the memory it saves (``launch_bound``): the frozen product with its bias, then the
    low-rank product added onto it, with no buffers joined or padded."""
    rows, weight_t = cast_to(rows, dtype), cast_to(weight, dtype).t()
    if bias is None:
        y = torch.mm(rows, weight_t, out=out) if out is not None else torch.mm(rows, weight_t)
    else:
        y = torch.addmm(cast_to(bias, dtype), rows, weight_t, out=out) if out is not None else torch.addmm(
            cast_to(bias, dtype), rows, weight_t)
    return y.addmm_(cast_to(xa, dtype), cast_to(b, dtype))


def _joined_product(rows: Tensor, weight: Tensor, xa: Tensor, b_t: Tensor, bias: Optional[Tensor], dtype: torch.dtype,
                    out: Optional[Tensor] = None) -> Tensor:
    """``rows Wᵀ + xa B (+ bias)`` in ``dtype`` as one product, for 2-d ``rows`` and ``xa``, where ``rows`` and ``W``
    must both be cast (autocast).

    They are cast into buffers that also hold ``xa`` (and a column of ones) and ``Bᵀ`` (and the bias): the product's
    inner size grows by rank + 1, the output is written once and rounded once, and no separate low-rank product
    writes it first (a bfloat16 product with an inner size of 5 takes a tenth of the frozen product's time). The inner
    size is padded to a multiple of 8 with zeros, which keeps the buffers' rows aligned for accelerator kernels.
    """
    inner, rank = rows.shape[1], xa.shape[1]
    used = inner + rank + (bias is not None)
    width = _aligned(used)
    left = torch.empty((rows.shape[0], width), dtype=dtype, device=rows.device)
    right = torch.empty((weight.shape[0], width), dtype=dtype, device=weight.device)
    left[:, :inner].copy_(rows)
    left[:, inner : inner + rank].copy_(xa)
    right[:, :inner].copy_(weight)
    right[:, inner : inner + rank].copy_(b_t)
    if bias is not None:
        left[:, used - 1].fill_(1)
        right[:, used - 1].copy_(bias)
    left[:, used:].zero_()
    right[:, used:].zero_()
    return torch.mm(left, right.t(), out=out) if out is not None else torch.mm(left, right.t())


def _joined_input_gradient(grad: Tensor, weight: Tensor, grad_xa: Tensor, a: Tensor) -> Tensor:
    """``grad W + grad_xa Aᵀ`` as one product, for a 2-d ``grad`` in a dtype that ``W`` must be cast to (autocast):
    ``W`` is cast into a buffer that also holds ``Aᵀ`` as extra rows (padded as in ``_joined_product``), so no
    separate low-rank pass reads and writes the input gradient. Worth it where the output is narrower than the
    input (an MLP's fc2): the copy of ``grad`` that it costs is smaller than the pass it saves."""
    out_features, rank = grad.shape[1], grad_xa.shape[1]
    used = out_features + rank
    left = torch.empty((grad.shape[0], _aligned(used)), dtype=grad.dtype, device=grad.device)
    right = torch.empty((left.shape[1], weight.shape[1]), dtype=grad.dtype, device=weight.device)
    left[:, :out_features].copy_(grad)
    left[:, out_features:used].copy_(grad_xa)
    right[:out_features].copy_(weight)
    right[out_features:used].copy_(a.t())
    left[:, used:].zero_()
    right[used:].zero_()
    return left @ right


def _aligned(inner: int) -> int:
    """``inner`` rounded up to a multiple of 8 elements (16 bytes in 16-bit dtypes)."""
    return -(-inner // 8) * 8


def _backward(grad: Tensor, x: Optional[Tensor], weight: Tensor, xa: Tensor, a: Tensor, b: Tensor,
              activation: Optional[nn.Module], needs_x: bool, needs_a: bool, needs_b: bool,
              precomputed: Optional[Tuple[Tensor, Optional[Tensor]]] = None,
              producer: Optional[_InputLayerGradients] = None
              ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The gradients of x, A and B that are asked for (see ``LowRankLinear``).

    ``precomputed``: ``(grad Bᵀ, (x A)ᵀ grad)``, already computed by the adapted fc2 after this layer; ``producer``:
    the gradients this (fc2) layer computes for the adapted fc1 before it (``_InputLayerGradients``)."""
    dtype = grad.dtype
    input_shape = (*grad.shape[:-1], weight.shape[1])
    grad = _rows(grad)
    a_, b_ = cast_to(a, dtype), cast_to(b, dtype)
    if precomputed is not None:
        grad_xa, grad_b = precomputed[0], precomputed[1] if needs_b else None
    else:
        grad_xa = grad @ b_.t()
        grad_b = cast_to(_rows(xa), dtype).t() @ grad if needs_b else None
    # W is cast anyway and the input is the wider side: the low-rank term joins the frozen product
    joined = (needs_x and weight.dtype != dtype and weight.shape[0] < weight.shape[1]
              and not launch_bound(grad.device))
    grad_x = None
    if needs_x:
        grad_x = _joined_input_gradient(grad, weight, grad_xa, a_) if joined else grad @ cast_to(weight, dtype)
    grad_a = None
    if activation is not None:
        if needs_x or needs_a:
            grad_a = _activation_backward(activation, x.reshape(-1, x.shape[-1]), grad_x, grad_xa, a_, needs_a,
                                          producer, low_rank_added=joined)
    else:
        if grad_x is not None and not joined:
            grad_x.addmm_(grad_xa, a_.t())
        if needs_a and launch_bound(grad.device):
            grad_a = cast_to(_rows(x), dtype).t() @ grad_xa
        elif needs_a:  # as (r, in), then transposed: several times faster than the (in, r) product on the CPU
            grad_a = (grad_xa.t() @ cast_to(_rows(x), dtype)).t().contiguous()
    if grad_x is not None:
        grad_x = grad_x.view(input_shape)
    grad_a = cast_to(grad_a, a.dtype) if grad_a is not None else None
    grad_b = cast_to(grad_b, b.dtype) if grad_b is not None else None
    return grad_x, grad_a, grad_b


def _differentiable_backward(grad: Tensor, x: Optional[Tensor], weight: Tensor, xa: Tensor, a: Tensor, b: Tensor,
                             activation: Optional[nn.Module], needs_x: bool, needs_a: bool, needs_b: bool
                             ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``_backward``'s gradients from out-of-place ops on the kept tensors, ``act(x)`` and ``x A`` recomputed: a
    graph of the gradients, so that a double backward (gradient penalties, MAML) differentiates them exactly.
    Without ``x`` (neither x nor A needs a gradient), the kept ``x A`` is a constant of the graph."""
    dtype, input_shape = grad.dtype, (*grad.shape[:-1], weight.shape[1])
    grad = grad.reshape(-1, grad.shape[-1])
    a_, b_ = a.to(dtype), b.to(dtype)
    act = inputs = None
    if x is not None:
        with torch.enable_grad():  # its own backward below (a batched backward runs without gradients)
            act = x if activation is None else activation.forward(x)  # a recomputation: hooks ran in forward
        inputs = act.reshape(-1, act.shape[-1]).to(dtype)
        xa = inputs @ a_
    xa = xa.reshape(-1, xa.shape[-1]).to(dtype)
    grad_xa = grad @ b_.t()
    grad_a = (inputs.t() @ grad_xa).to(a.dtype) if needs_a else None
    grad_b = (xa.t() @ grad).to(b.dtype) if needs_b else None
    grad_x = None
    if needs_x:
        grad_x = (grad @ weight.to(dtype) + grad_xa @ a_.t()).view(input_shape)
        if activation is not None:
            grad_x = torch.autograd.grad(act, x, grad_x.to(act.dtype), create_graph=True)[0]
    return grad_x, grad_a, grad_b


def _gelu_name(activation: Optional[nn.GELU]) -> str:
    """An operator's activation argument: "" for none, else the GELU's ``approximate`` ("none" or "tanh")."""
    return "" if activation is None else activation.approximate


def _gelu(name: str) -> Optional[nn.GELU]:
    return nn.GELU(approximate=name) if name else None


# The compiled form of LowRankLinear: two operators whose bodies run the eager code, with autocast's choice of
# dtype made at trace time and passed in (compiled code runs without the autocast state).
@torch.library.custom_op("nola_vision::low_rank_linear", mutates_args=())
def _low_rank_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor, gelu: str,
                        dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    with torch.autocast(x.device.type, enabled=False):
        return _forward(x, weight, bias, a, b, _gelu(gelu), dtype)


@_low_rank_linear_op.register_fake
def _(x, weight, bias, a, b, gelu, dtype):
    lead = x.shape[:-1]
    return x.new_empty((*lead, weight.shape[0]), dtype=dtype), x.new_empty((*lead, a.shape[-1]), dtype=dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, a, b, gelu, dtype = inputs
    ctx.gelu = gelu
    ctx.save_for_backward(_kept_input(ctx, x, bool(gelu)), weight, output[1], a, b)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _op_backward(ctx, grad: Tensor, grad_xa: Optional[Tensor]):
    x, weight, xa, a, b = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads = _low_rank_linear_backward_op(grad, x, weight, xa, a, b, ctx.gelu, needs[0], needs[3], needs[4])
    grad_x, grad_a, grad_b = (g if needed else None for g, needed in zip(grads, (needs[0], needs[3], needs[4])))
    return grad_x, None, None, grad_a, grad_b, None, None


_low_rank_linear_op.register_autograd(_op_backward, setup_context=_setup_context)


@torch.library.custom_op("nola_vision::low_rank_linear_backward", mutates_args=())
def _low_rank_linear_backward_op(grad: Tensor, x: Optional[Tensor], weight: Tensor, xa: Tensor, a: Tensor,
                                 b: Tensor, gelu: str, needs_x: bool, needs_a: bool, needs_b: bool
                                 ) -> Tuple[Tensor, Tensor, Tensor]:
    grads = _backward(grad, x, weight, xa, a, b, _gelu(gelu), needs_x, needs_a, needs_b)
    return tuple(g if g is not None else grad.new_empty(0) for g in grads)  # an operator returns tensors only


@_low_rank_linear_backward_op.register_fake
def _(grad, x, weight, xa, a, b, gelu, needs_x, needs_a, needs_b):
    grad_x = grad.new_empty((*grad.shape[:-1], weight.shape[1]) if needs_x else (0,))
    return grad_x, a.new_empty(a.shape if needs_a else (0,)), b.new_empty(b.shape if needs_b else (0,))


def _gelu_out(activation: nn.GELU, h: Tensor, out: Optional[Tensor]) -> Tensor:
    if out is None:
        return torch.ops.aten.gelu(h, approximate=activation.approximate)
    return torch.ops.aten.gelu.out(h, approximate=activation.approximate, out=out)


def _gelu_backward_(activation: nn.GELU, grad: Tensor, h: Tensor) -> None:
    torch.ops.aten.gelu_backward.grad_input(grad, h, approximate=activation.approximate, grad_input=grad)


# Activations with one-op forward and backward that write into given buffers (timm ViTs: GELU): no allocation per
# block, and no vjp, which costs more than a block's arithmetic. Other activations go through torch.func.vjp.
_ACTIVATION_OPS = {nn.GELU: (_gelu_out, _gelu_backward_)}


def _activation_backward(activation: nn.Module, h: Tensor, grad_x: Optional[Tensor], grad_xa: Tensor, a: Tensor,
                         needs_a: bool, producer: Optional[_InputLayerGradients] = None,
                         low_rank_added: bool = False) -> Optional[Tensor]:
    """Finish an adapted ``fc2``'s input gradient in place and return A's gradient, one block of rows at a time.

    ``grad_x`` holds the frozen part ``grad W``; each block gets the low-rank part ``grad_xa Aᵀ`` (unless
    ``low_rank_added``: ``_joined_input_gradient`` included it), then the activation's backward, while it is in cache.
    The block's recomputed activation output gives A's gradient ``act(h)ᵀ grad_xa``, so the activation output never
    exists for all rows at once. Each finished block of h's gradient also gives the ``producer``'s gradients (an
    adapted fc1's), if any.
    """
    if producer is None and _one_launch_bound_block(h):
        if grad_x is not None and not low_rank_added:
            grad_x.addmm_(grad_xa, a.t())
        x = _activation_block(activation, h, grad_x, None, needs_a)
        return cast_to(x, grad_xa.dtype).t() @ grad_xa if needs_a else None
    rows = _block_rows(h)
    a_t = a.t()
    # (rank, in) and row-major, the fast orientation for these products (``zeros_like(a_t)`` would keep a's
    # transposed strides: a column-major accumulator is ten times slower to add into).
    grad_a_t = torch.zeros(a_t.shape, dtype=a_t.dtype, device=a_t.device) if needs_a else None
    known = type(activation) in _ACTIVATION_OPS
    buffer = torch.empty(min(rows, h.shape[0]), h.shape[-1], dtype=h.dtype, device=h.device) if known else None
    for start in range(0, h.shape[0], rows):
        h_block, grad_xa_block = h[start : start + rows], grad_xa[start : start + rows]
        grad_block = grad_x[start : start + rows] if grad_x is not None else None
        if grad_block is not None and not low_rank_added:
            grad_block.addmm_(grad_xa_block, a_t)
        out = buffer[: h_block.shape[0]] if buffer is not None else None
        x_block = _activation_block(activation, h_block, grad_block, out, needs_a)
        if producer is not None and grad_block is not None:
            producer.add(start, grad_block)
        if grad_a_t is not None:
            grad_a_t.addmm_(grad_xa_block.t(), cast_to(x_block, grad_xa.dtype))
    return grad_a_t.t().contiguous() if grad_a_t is not None else None


def _activation_block(activation: nn.Module, h: Tensor, grad: Optional[Tensor], out: Optional[Tensor],
                      needs_output: bool) -> Optional[Tensor]:
    """``act(h)`` if needed (into ``out`` when the activation has an out op), and ``grad`` turned into h's gradient."""
    if type(activation) in _ACTIVATION_OPS:
        forward_out, backward_ = _ACTIVATION_OPS[type(activation)]
        x = forward_out(activation, h, out) if needs_output else None
        if grad is not None:
            backward_(activation, grad, h)
        return x
    forward = activation.forward  # a recomputation: the module's hooks ran in the forward pass already
    if grad is None:
        return forward(h) if needs_output else None
    x, activation_vjp = torch.func.vjp(forward, h)
    grad.copy_(activation_vjp(grad)[0])
    return x
