"""An adapted layer's training step: the values and gradients of the plain ops, with no more memory than the frozen
layer needs (one output buffer, one input gradient, no recomputed activation held whole, no cast weight copies)."""
import weakref

import pytest
import torch
import torch.nn.functional as F
from counted_ops import CountedOps
from tiny_models import tiny_vit
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import nola_vision as nv
from nola_vision.core.functions import _forward, low_rank_linear


class PeakOfNewTensors(TorchDispatchMode):
    """The highest total size of the tensor storages created under this mode and still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live, self.refs, self.total, self.peak = {}, {}, 0, 0

    def _freed(self, key, _ref) -> None:
        self.total -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key not in inputs and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.refs[key] = weakref.ref(storage, lambda ref, key=key: self._freed(key, ref))
                    self.total += storage.nbytes()
        self.peak = max(self.peak, self.total)
        return out


def _plain(x, weight, bias, a, b, activation):
    inputs = x if activation is None else activation(x)
    return F.linear(inputs, weight, bias) + (inputs @ a) @ b


def _tensors(generator, features_in=24, features_out=16, rank=3):
    def draw(*shape, grad=False):
        return torch.randn(*shape, generator=generator).requires_grad_(grad)

    return (draw(2, 7, features_in, grad=True), draw(features_out, features_in), draw(features_out),
            draw(features_in, rank, grad=True), draw(rank, features_out, grad=True))


# GELU has a one-op backward; SiLU and Tanh go through torch.func.vjp.
@pytest.mark.parametrize("activation", [None, nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Tanh()])
def test_fused_low_rank_linear_gives_the_values_and_gradients_of_the_plain_ops(activation):
    generator = torch.Generator().manual_seed(0)
    tensors = _tensors(generator)
    grad = torch.randn(2, 7, 16, generator=generator)
    fused = low_rank_linear(*tensors, activation)
    plain = _plain(*tensors, activation)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    trained = [tensors[i] for i in (0, 3, 4)]
    for got, expected in zip(torch.autograd.grad(fused, trained, grad), torch.autograd.grad(plain, trained, grad)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fused_low_rank_linear_computes_only_the_gradients_asked_for():
    x, weight, bias, a, b = _tensors(torch.Generator().manual_seed(0))
    x.requires_grad_(False)
    out = low_rank_linear(x, weight, bias, a, b, nn.GELU())
    grad_a, grad_b = torch.autograd.grad(out.sum(), [a, b])
    plain = torch.autograd.grad(_plain(x, weight, bias, a, b, nn.GELU()).sum(), [a, b])
    torch.testing.assert_close(grad_a, plain[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_b, plain[1], rtol=1e-5, atol=1e-6)


# Which of x, A, B need a gradient: every pattern keeps a different set of tensors for backward.
@pytest.mark.parametrize("needs", [(True, True, True), (False, True, True), (True, False, True), (False, False, True)])
@pytest.mark.parametrize("activation", [None, nn.GELU(), nn.SiLU()])
def test_backward_with_create_graph_gives_gradients_that_differentiate_exactly(activation, needs):
    """A gradient penalty or MAML's inner step differentiates the gradients again: checked numerically in float64."""
    generator = torch.Generator().manual_seed(0)
    x, weight, bias, a, b = (t.detach().double() for t in _tensors(generator, features_in=6, features_out=5, rank=2))
    trained = [t.requires_grad_(need) for t, need in zip((x, a, b), needs)]

    def function(*inputs):
        values = iter(inputs)
        x_, a_, b_ = (next(values) if t.requires_grad else t for t in trained)
        return low_rank_linear(x_, weight, bias, a_, b_, activation)

    inputs = [t for t in trained if t.requires_grad]
    assert torch.autograd.gradcheck(function, inputs)
    assert torch.autograd.gradgradcheck(function, inputs)


@pytest.mark.parametrize("method", ["nola", "lora"])
def test_a_maml_step_through_an_adapted_model_matches_plain_autograd(method, monkeypatch):
    """One inner step and the outer gradient (second order) through a whole model: the fused layer and the chunked
    combination of shared bases give what plain differentiable ops give."""
    from nola_vision.core import basis, layer

    config = (nv.NOLAConfig(rank=2, num_basis_a=80, num_basis_b=80, targets=["mlp.fc1", "mlp.fc2"])
              if method == "nola" else nv.LoRAConfig(rank=2, targets=["attn.q", "attn.v"]))
    model = nv.inject(tiny_vit(num_classes=3), config)
    for block in model.blocks:
        block.attn.fused_attn = False  # torch's fused attention kernels have no double backward
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    images, labels = torch.randn(4, 3, 32, 32, generator=generator), torch.tensor([0, 1, 2, 0])
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}

    def outer_gradient():
        loss = F.cross_entropy(torch.func.functional_call(model, params, (images,)), labels)
        inner = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        fast = {name: p - 0.5 * g for (name, p), g in zip(params.items(), inner)}
        return torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, fast, (images,)), labels),
                                   list(params.values()))

    got = outer_gradient()
    monkeypatch.setattr(layer, "low_rank_linear", _plain)
    monkeypatch.setattr(basis._CombineBases, "apply", staticmethod(
        lambda coefficients, spec, *_: coefficients.float() @ spec.generate(coefficients.device).flatten(1)))
    expected = outer_gradient()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["nola", "lora"])
def test_adapted_fc2_backward_needs_about_one_input_gradient_of_memory(method):
    """The recomputed activation, the adapter's and the frozen layer's input gradients are never held whole."""
    config = (nv.NOLAConfig(num_basis_a=16, num_basis_b=16) if method == "nola"
              else nv.LoRAConfig(targets=["mlp.fc1", "mlp.fc2"]))
    fc2 = nv.inject(tiny_vit(), config).blocks[0].mlp.fc2
    assert fc2.input_activation is not None
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(8, 512, fc2.in_features, generator=generator).requires_grad_()  # 4 MiB: 4 blocks of rows
    out = fc2(h)
    grad = torch.randn(out.shape, generator=generator)
    with PeakOfNewTensors() as memory:
        out.backward(grad)
    assert memory.peak <= 1.6 * h.nbytes  # the input gradient plus a block of rows or two, never 2 whole tensors


class AccumulationTargets(TorchDispatchMode):
    """The tensors that in-place matrix products (``addmm_``) accumulate into."""

    def __init__(self) -> None:
        super().__init__()
        self.targets = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.addmm_.default:
            self.targets.append((tuple(args[0].shape), args[0].stride()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["nola", "lora"])
def test_adapted_layers_accumulate_their_gradients_into_row_major_tensors(method):
    """A's gradient of an adapted fc2 is summed over row blocks into a (rank, in) tensor: row-major it is a fast
    product, column-major (``zeros_like`` of ``Aᵀ`` keeps A's strides) ten times slower, 3% of a ViT-B step."""
    config = (nv.NOLAConfig(num_basis_a=16, num_basis_b=16) if method == "nola"
              else nv.LoRAConfig(targets=["mlp.fc1", "mlp.fc2"]))
    model = nv.inject(tiny_vit(), config).train()
    assert model.blocks[0].mlp.fc2.input_activation is not None
    generator = torch.Generator().manual_seed(0)
    loss = model(torch.randn(2, 3, 32, 32, generator=generator)).square().mean()
    with AccumulationTargets() as accumulations:
        loss.backward()
    assert (config.rank, model.blocks[0].mlp.fc2.in_features) in {shape for shape, _ in accumulations.targets}
    for shape, stride in accumulations.targets:
        assert stride == (shape[1], 1), f"an accumulation into {shape} with strides {stride}"


def test_the_compiled_operator_holds_an_adapted_fc2s_activation_output_for_half_the_rows_at_a_time():
    """At the end of a compiled forward pass (the step's peak) the operator's body never holds the activation
    output of all rows: that frees more than the compiler keeps beyond eager (docs/benchmarks/training.md)."""
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(8, 512, 256, generator=generator)  # 4 MiB of pre-activations
    weight, bias = torch.randn(16, 256, generator=generator), torch.randn(16, generator=generator)
    a, b = torch.randn(256, 3, generator=generator), torch.randn(3, 16, generator=generator)
    with PeakOfNewTensors() as memory:
        out, xa = _forward(h, weight, bias, a, b, nn.GELU(), torch.float32)
    assert memory.peak <= 0.6 * h.nbytes
    # Sums of 256 products of order 1: float32 rounding depends on the order the products sum in.
    torch.testing.assert_close(out, _plain(h, weight, bias, a, b, nn.GELU()), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(xa, F.gelu(h) @ a, rtol=1e-5, atol=1e-4)


def test_autocast_training_keeps_no_low_precision_copy_of_an_adapted_frozen_weight(images):
    model = nv.inject(tiny_vit(), nv.NOLAConfig(num_basis_a=16, num_basis_b=16)).train()
    weights = {tuple(layer.weight.shape) for layer in nv.adapted_layers(model).values()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(images).float().logsumexp(-1).sum()
    assert not [t for t in saved if t.dtype == torch.bfloat16 and tuple(t.shape) in weights]
    loss.backward()
    assert all(layer.nola_alpha.grad is not None for layer in nv.adapted_layers(model).values())


def test_fused_low_rank_linear_refuses_a_trainable_weight_it_would_give_no_gradient():
    x, weight, bias, a, b = _tensors(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="freeze the weight"):
        low_rank_linear(x, weight.requires_grad_(), bias, a, b, None)


def test_an_adapted_layer_whose_weight_was_unfrozen_still_trains_it(images):
    model = nv.inject(tiny_vit(), nv.LoRAConfig(targets=["mlp.fc1", "mlp.fc2"])).train()
    fc2 = model.blocks[0].mlp.fc2
    fc2.weight.requires_grad_(True)
    model(images).sum().backward()
    assert fc2.weight.grad is not None and fc2.weight.grad.abs().sum() > 0 and fc2.lora_A.grad is not None


@pytest.mark.parametrize("activation", [None, nn.GELU()])
def test_under_autocast_the_output_gradient_reaches_the_fused_backward_in_the_products_dtype(activation, monkeypatch):
    # The frozen product's gradient is handed back through a sink made in autocast's dtype: a float32 sink would
    # have autograd cast every bf16 output gradient up (a copy and other numerics).
    from nola_vision.core import functions

    seen, backward = [], functions._backward
    monkeypatch.setattr(functions, "_backward",
                        lambda grad, *args, **kwargs: seen.append(grad.dtype) or backward(grad, *args, **kwargs))
    x, weight, bias, a, b = _tensors(torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = low_rank_linear(x, weight, bias, a, b, activation)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and seen == [torch.bfloat16] and a.grad is not None and x.grad is not None


@pytest.mark.parametrize("compiled", [False, True])
def test_a_float64_model_under_autocast_keeps_its_adapted_layers_in_float64(compiled, images):
    # Autocast never casts float64 (F.linear stays in it): neither may the adapted layer's own product.
    model = nv.inject(tiny_vit(), nv.NOLAConfig(num_basis_a=16, num_basis_b=16)).double().train()
    forward = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    expected = model(images.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = forward(images.double())
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)


class WholeProducts(TorchDispatchMode):
    """The matrix products that take a whole tensor of a given shape (not a block of its rows), transposed or not."""

    def __init__(self, shape) -> None:
        super().__init__()
        self.shape, self.reads = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() == 2]
        products = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default)
        if func in products and any(self.shape in (tuple(t.shape), tuple(t.t().shape)) for t in tensors):
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


def _mlp_pair(generator, rows=64, features=12, hidden=40, rank=3):
    """An adapted fc1 and fc2 around a GELU: x, its tensors and fc1's trained factors."""
    def draw(*shape, grad=False):
        return (torch.randn(*shape, generator=generator) * 0.5).requires_grad_(grad)

    x = draw(2, rows // 2, features, grad=True)
    fc1 = draw(hidden, features), draw(hidden), draw(features, rank, grad=True), draw(rank, hidden, grad=True)
    fc2 = draw(features, hidden), draw(features), draw(hidden, rank, grad=True), draw(rank, features, grad=True)
    return x, fc1, fc2


def _through_mlp(function, x, fc1, fc2, between=None):
    h = function(x, *fc1, None)
    if between is not None:
        h = between(h)
    return function(h, *fc2, nn.GELU())


# Hooks or other uses of fc1's output change the gradient fc1 gets: it must then compute its gradients itself.
BETWEEN = {
    "nothing": None,
    "a hook returning a new gradient": lambda h: h.register_hook(lambda g: g * 3) and h,
    "a hook changing the gradient in place": lambda h: h.register_hook(lambda g: (g.mul_(3), None)[1]) and h,
    "a hook changing it through .data": lambda h: h.register_hook(lambda g: (g.data.mul_(3), None)[1]) and h,
}


@pytest.mark.parametrize("device", ["cpu", "launch-bound"])
@pytest.mark.parametrize("between", list(BETWEEN))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_adapted_mlp_gives_the_gradients_of_the_plain_ops_when_fc2_computes_fc1s(between, precision, device,
                                                                                    monkeypatch, request):
    """The adapted fc2's backward computes the adapted fc1's x A and B gradients block by block (several blocks
    here): the same gradients as plain float32 autograd (under bf16 autocast, within bf16's rounding), also where a
    hook or a second use changes what fc1 receives. On a launch-bound device (the CPU making an accelerator's
    choices) each layer computes its own, with the few-launch products."""
    from nola_vision.core import functions

    if device == "launch-bound":
        request.getfixturevalue("launch_bound")
    monkeypatch.setattr(functions, "_ACTIVATION_BLOCK_ELEMENTS", 40 * 10)  # blocks of 10 of the 64 rows
    generator = torch.Generator().manual_seed(0)
    x, fc1, fc2 = _mlp_pair(generator)
    trained = [x, *fc1[2:], *fc2[2:]]
    grad = torch.randn(2, 32, 12, generator=generator)

    def gradients(function, bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = _through_mlp(function, x, fc1, fc2, BETWEEN[between])
            second = _through_mlp(function, x, fc1, fc2, lambda h: torch.cat([h[..., :1] * 2, h[..., 1:]], -1))
        return torch.autograd.grad((out + second).float(), trained, grad)

    for got, expected in zip(gradients(low_rank_linear, precision == "bf16"), gradients(_plain, False)):
        if precision == "fp32":
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        else:  # bf16 keeps 8 bits: these sums of a few hundred products are within 1% of their largest value
            assert (got - expected).abs().max() <= 0.015 * expected.abs().max()


class Products(TorchDispatchMode):
    """Every matrix product: the shapes of its 2-d operands and of what it writes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default):
            operands = tuple(tuple(t.shape) for t in args if isinstance(t, torch.Tensor) and t.dim() == 2)
            self.calls.append((operands[-2:], tuple(result.shape)))
        return result


def test_under_autocast_the_low_rank_term_joins_the_frozen_product_where_w_is_cast_anyway(monkeypatch):
    """Autocast casts fc1's float32 input and W to bfloat16 anyway: they are cast into buffers that also hold x A,
    Bᵀ and the bias, so one product of inner size 12 + 3 + 1 (padded to a multiple of 8) writes fc1's output, where
    a rank-4 product used to write it first. In fc2's backward W is cast too and its input is the wider side: one
    product of inner size 12 + 3 (padded) gives the input gradient with its low-rank part, and no rank-3 update
    reads and writes its blocks again."""
    from nola_vision.core import functions

    monkeypatch.setattr(functions, "_ACTIVATION_BLOCK_ELEMENTS", 40 * 10)  # blocks of 10 of the 64 rows
    x, fc1, fc2 = _mlp_pair(torch.Generator().manual_seed(0))
    with Products() as forward, torch.autocast("cpu", dtype=torch.bfloat16):
        out = _through_mlp(low_rank_linear, x, fc1, fc2)
    assert [operands for operands, written in forward.calls if written == (64, 40)] == [((64, 16), (16, 40))]
    with Products() as backward:
        out.float().sum().backward()
    assert [operands for operands, written in backward.calls if written == (64, 40)] == [((64, 16), (16, 40))]
    assert not [operands for operands, written in backward.calls if written[1] == 40 and written[0] < 64
                and operands[0][1] == 3]  # no grad_xa Aᵀ added to a block of rows


def test_accelerators_activate_an_adapted_fc2s_input_in_few_blocks_where_the_cpu_takes_cache_sized_ones():
    """Each block costs kernel launches on an accelerator (a GPU step of NOLA-MLP was launch-bound at 2 MiB blocks):
    there a ViT-B batch of 32 takes 3 blocks each way, on the CPU 38 (meta stands in for an accelerator)."""
    for device, blocks in (("cpu", 38), ("meta", 3)):
        x = torch.randn(32, 197, 3072, device=device, requires_grad=True)
        weight = torch.randn(768, 3072, device=device)
        a = torch.randn(3072, 4, device=device, requires_grad=True)
        b = torch.randn(4, 768, device=device, requires_grad=True)
        with CountedOps() as ops:
            low_rank_linear(x, weight, None, a, b, nn.GELU()).sum().backward()
        assert (ops.calls["gelu"], ops.calls["gelu_backward"]) == (2 * blocks, blocks), device  # forward, recomputed


@pytest.mark.parametrize("method", ["nola", "lora"])
def test_a_layer_adapted_over_its_whole_width_hands_its_b_on_as_a_view(method):
    """B of a one-slice layer reaches the product as a view: ``b[0]`` gave a select, whose backward writes a zeroed
    copy of B's gradient (two more kernels per layer and step on a GPU). A is a view too (no permute), and the
    factors' dtype is chosen without a dispatched ``promote_types``: every op is a host cost per layer and step."""
    model = nv.inject(tiny_vit(), nv.get_method(method).config_cls(targets=["mlp.fc1"]))
    layer = model.blocks[0].mlp.fc1
    with CountedOps() as ops:
        layer(torch.randn(2, 5, layer.in_features)).sum().backward()
    assert ops.calls["select_backward"] == 0 and ops.calls["select"] == 0
    assert ops.calls["permute"] == 0 and ops.calls["promote_types"] == 0


def test_an_adapted_fc1_reads_its_mlp_wide_output_gradient_once_in_backward(monkeypatch):
    """Its x A and B gradients come from the adapted fc2's blocks, while each block of that gradient is in cache:
    fc1's own backward reads the whole gradient only for the frozen product."""
    from nola_vision.core import functions

    monkeypatch.setattr(functions, "_ACTIVATION_BLOCK_ELEMENTS", 40 * 10)
    x, fc1, fc2 = _mlp_pair(torch.Generator().manual_seed(0))
    out = _through_mlp(low_rank_linear, x, fc1, fc2)
    with WholeProducts((64, 40)) as products:
        out.sum().backward()
    assert products.reads == [torch.ops.aten.mm.default]  # grad W, then the low-rank part added a block at a time


@pytest.mark.parametrize("method", ["nola", "lora"])
def test_an_adapted_model_with_gradient_checkpointing_gets_the_gradients_of_the_plain_ops(method, monkeypatch):
    """fc2 computing fc1's gradients holds under timm's gradient checkpointing (blocks recomputed in backward)."""
    from nola_vision.core import functions, layer

    monkeypatch.setattr(functions, "_ACTIVATION_BLOCK_ELEMENTS", 512)
    config = (nv.NOLAConfig(rank=2, num_basis_a=32, num_basis_b=32) if method == "nola"
              else nv.LoRAConfig(rank=2, targets=["mlp.fc1", "mlp.fc2"]))
    model, gradients = _model_and_its_gradients(config, checkpointing=True)
    got = gradients()
    monkeypatch.setattr(layer, "low_rank_linear", _plain)
    for g, e in zip(got, gradients()):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def _model_and_its_gradients(config, checkpointing):
    """A tiny ViT adapted with ``config``, its trained tensors seeded away from their init, and a function giving
    their gradients for a fixed batch."""
    generator = torch.Generator().manual_seed(0)
    model = nv.inject(tiny_vit(num_classes=3), config).train()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.set_grad_checkpointing(checkpointing)
    images = torch.randn(3, 3, 32, 32, generator=generator)

    def gradients():
        model.zero_grad()
        model(images).square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    return model, gradients


def test_what_fc2_computed_for_an_adapted_fc1_its_backward_never_ran_is_not_kept():
    """A backward pass that stops at fc1's output (gradients of it, or of fc2's factors only) leaves nothing of the
    MLP-wide gradient on fc1's node for as long as the graph is kept."""
    from nola_vision.core import functions

    x, fc1, fc2 = _mlp_pair(torch.Generator().manual_seed(0))
    h = low_rank_linear(x, *fc1, None)
    out = low_rank_linear(h, *fc2, nn.GELU())
    node = functions._producer(h)
    assert node is not None
    (grad_h,) = torch.autograd.grad(out.sum(), [h], retain_graph=True)
    assert node.precomputed is None
    torch.autograd.grad(out.sum(), fc2[2:], retain_graph=True)
    assert node.precomputed is None
    grads = torch.autograd.grad(out.sum(), [x, *fc1[2:]], retain_graph=True)  # a full pass: the right gradients
    expected = torch.autograd.grad(h, [x, *fc1[2:]], grad_h)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


@pytest.fixture
def launch_bound(monkeypatch):
    """The CPU making an accelerator's choices (``functions.launch_bound``): the few-launch products, no joined
    buffers, no fc1 gradients computed inside fc2's blocks."""
    from nola_vision.core import functions

    monkeypatch.setattr(functions, "launch_bound", lambda device: True)


@pytest.mark.parametrize("activation", [None, nn.GELU(), nn.SiLU()])
@pytest.mark.parametrize("with_bias", [True, False])
def test_on_a_launch_bound_device_the_fused_layer_gives_the_values_and_gradients_of_the_plain_ops(
        activation, with_bias, launch_bound):
    generator = torch.Generator().manual_seed(0)
    x, weight, bias, a, b = _tensors(generator)
    bias = bias if with_bias else None
    grad = torch.randn(2, 7, 16, generator=generator)
    fused, plain = low_rank_linear(x, weight, bias, a, b, activation), _plain(x, weight, bias, a, b, activation)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for got, expected in zip(torch.autograd.grad(fused, [x, a, b], grad), torch.autograd.grad(plain, [x, a, b], grad)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_on_a_launch_bound_device_a_layer_is_one_autograd_node_unless_saved_tensor_hooks_may_recompute_it(
        launch_bound):
    """Two nodes (the product apart) let checkpointing stop recomputing before the frozen product; without saved-tensor
    hooks nothing recomputes, and each node costs the host a call in forward and one in backward."""
    x, weight, bias, a, b = _tensors(torch.Generator().manual_seed(0))
    assert type(low_rank_linear(x, weight, bias, a, b, None).grad_fn).__name__ == "_FusedLowRankLinearBackward"
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor, lambda tensor: tensor):
        split = low_rank_linear(x, weight, bias, a, b, None)
    assert type(split.grad_fn).__name__ == "_FrozenProductBackward"


def test_on_a_launch_bound_device_an_adapted_mlp_launches_only_its_products_and_casts(launch_bound):
    """Under bf16 autocast on an accelerator every kernel is a launch the host pays for: fc1 and fc2 write their
    outputs with the frozen product and one low-rank addmm_ (no joined, padded buffers filled by copies), and fc2's
    backward neither joins W with Aᵀ nor computes fc1's gradients a block at a time."""
    x, fc1, fc2 = _mlp_pair(torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _through_mlp(low_rank_linear, x, fc1, fc2)  # a first pass makes the sink, once per dtype and device
    with CountedOps() as forward, torch.autocast("cpu", dtype=torch.bfloat16):
        out = _through_mlp(low_rank_linear, x, fc1, fc2)
    with CountedOps() as backward:
        out.float().sum().backward()
    assert (forward.calls["addmm"], forward.calls["addmm_"], forward.calls["mm"]) == (2, 2, 2)  # frozen, ΔW, x A
    for ops in (forward, backward):
        assert not {"fill_", "zero_", "copy_", "cat", "empty"} & set(ops.calls), ops.calls
    # Per layer one view of its input as rows, one of its output in the input's shape; x A stays rows
    assert forward.calls["view"] + forward.calls["_unsafe_view"] + forward.calls["reshape"] == 4
    # x cast to bfloat16 once, for x A and the product; fc1's output is in it already; each of W, bias, A, B once
    assert forward.calls["_to_copy"] == 1 + 2 * 4
    # Per layer five: the x A, B, A and x gradients, and x A's part of x's gradient added onto it.
    assert backward.calls["mm"] + backward.calls["addmm_"] == 10


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("method", ["nola", "lora"])
def test_on_a_launch_bound_device_an_adapted_model_gets_the_gradients_of_the_plain_ops(method, checkpointing,
                                                                                      launch_bound, monkeypatch):
    from nola_vision.core import layer
    from nola_vision.core.inject import adapter_state

    config = (nv.NOLAConfig(rank=2, num_basis_a=32, num_basis_b=32) if method == "nola"
              else nv.LoRAConfig(rank=2, targets=["attn.q", "attn.v", "mlp.fc1", "mlp.fc2"]))
    model, gradients = _model_and_its_gradients(config, checkpointing)
    got = gradients()
    if method == "nola":  # an accelerator's training pass holds the shared codes
        assert adapter_state(model).bank.nbytes() > 0
    monkeypatch.setattr(layer, "low_rank_linear", _plain)
    for g, e in zip(got, gradients()):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_on_a_launch_bound_device_the_compiled_operators_body_casts_the_input_once(launch_bound):
    generator = torch.Generator().manual_seed(0)
    x, weight, bias, a, b = _tensors(generator)
    x, a, b = x.detach(), a.detach(), b.detach()
    with CountedOps() as ops:
        y, xa = _forward(x, weight, bias, a, b, None, torch.bfloat16)
    assert ops.calls["_to_copy"] == 5  # x, then W, the bias, A and B
    expected = _plain(x, weight, bias, a, b, None)
    assert (y.float() - expected).abs().max() <= 0.015 * expected.abs().max()  # within bf16's rounding
