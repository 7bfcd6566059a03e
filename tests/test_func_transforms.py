"""torch.func transforms (grad, vmap) and TorchScript tracing of adapted models: per-sample gradients, as
differential-privacy training and influence functions take them, equal autograd's; a traced model, the eager one's."""
import contextlib
import copy

import pytest
import torch
from tiny_models import as_if_trained, tiny_vit
from torch.func import functional_call, grad, jacfwd, vmap

import nola_vision as nv

CONFIGS = {"lora": nv.LoRAConfig(rank=2, targets=["attn.q", "attn.v", "mlp.fc2"]),
           "nola": nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8),
           "nola_per_layer": nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8, basis="per_layer")}
IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def adapted(key):
    return as_if_trained(nv.inject(tiny_vit(), CONFIGS[key]), 1, scale=0.2).train()


def assert_per_sample_gradients_equal_autograds(model, images, rtol: float, atol: float) -> None:
    """vmap(grad) of the trained tensors, image by image, against autograd's backward of each image alone."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def loss(values, image):
        return functional_call(model, values, (image[None],), strict=False).logsumexp(-1).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, images)
    for i, image in enumerate(images):
        model.zero_grad()
        model(image[None]).logsumexp(-1).sum().backward()
        for name in params:
            torch.testing.assert_close(per_sample[name][i], model.get_parameter(name).grad, rtol=rtol, atol=atol,
                                       msg=name)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_per_sample_gradients_by_vmap_of_grad_equal_autograds_one_image_at_a_time(key):
    """The library's autograd functions had no setup_context, so every torch.func transform refused the model."""
    assert_per_sample_gradients_equal_autograds(adapted(key), IMAGES, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("key", ["nola", "nola_per_layer"])
def test_a_float64_models_per_sample_gradients_keep_float64s_precision(key):
    """Under torch.func the bases were decoded in float32 and cast: a float64 model's outputs and gradients there
    were float32-accurate (1e-7 apart from eager autograd, where float64 gives 1e-16)."""
    model = adapted(key).double().eval()
    images = IMAGES.double()
    with torch.no_grad():
        torch.testing.assert_close(vmap(model)(images[:, None]).squeeze(1), model(images), rtol=1e-13, atol=0)
    assert_per_sample_gradients_equal_autograds(model, images, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_functional_call_under_gradient_checkpointing_gives_autograds_gradients(key):
    """Shared bases: the checkpointed blocks recomputed in backward, after functional_call had put the model's own
    tensors back, took the kept combination for stale and combined again: torch refused the other saved tensors."""
    model = adapted(key)
    model.set_grad_checkpointing(True)
    params = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters() if p.requires_grad}
    got = torch.autograd.grad(functional_call(model, params, (IMAGES,)).sum(), list(params.values()))
    expected = torch.autograd.grad(model(IMAGES).sum(), [model.get_parameter(name) for name in params])
    for name, a, b in zip(params, got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_grad_through_a_merged_adapter_is_refused_under_torch_func_too():
    model = adapted("nola")
    nv.merge(model)
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(RuntimeError, match="backward through a merged adapter"):
        grad(lambda values: functional_call(model, values, (IMAGES,), strict=False).sum())(params)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_functional_call_on_a_merged_model_refuses_other_adapter_tensors(key):
    """A merged pass computed the ΔW merged in and silently ignored the adapter tensors functional_call passed (the
    outputs of another task's tensors were those of the merged one's)."""
    model = adapted(key).eval()
    others = {name: 3 * p.detach() for name, p in model.named_parameters() if p.requires_grad}
    expected = functional_call(model, others, (IMAGES,), strict=False)
    nv.merge(model)
    with pytest.raises(RuntimeError, match="functional_call"):
        functional_call(model, others, (IMAGES,), strict=False)
    # its own tensors, or none, are what is merged; so are equal copies (accelerate's offload hooks pass such)
    own = dict(model.named_parameters())
    torch.testing.assert_close(functional_call(model, own, (IMAGES,)), model(IMAGES))
    copies = {name: p.detach().clone() for name, p in own.items()}
    torch.testing.assert_close(functional_call(model, copies, (IMAGES,)), model(IMAGES))
    nv.unmerge(model)
    torch.testing.assert_close(functional_call(model, others, (IMAGES,), strict=False), expected)


def test_vmap_over_adapter_tensors_of_a_merged_model_is_refused_by_name():
    """A merged layer compared the tensors it was given with torch.equal, which has no batching rule: vmap over
    stacked adapter tensors failed inside torch."""
    model = adapted("lora").eval()
    nv.merge(model)
    stacked = {name: torch.stack([p.detach()] * 2) for name, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad(), pytest.raises(RuntimeError, match="LoRALinear is merged, and torch.func.vmap gave it"):
        vmap(lambda values: functional_call(model, values, (IMAGES,), strict=False))(stacked)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_forward_mode_derivatives_with_gradients_on_equal_a_plain_models(key):
    """Dual tensors (torch.autograd.forward_ad) in grad mode reached the library's autograd functions, which define no
    forward derivative: torch refused the pass. Merged, the input's tangent passes; an adapter tensor's is refused."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import jvp

    model = adapted(key).eval()
    for block in model.blocks:
        block.attn.fused_attn = False  # torch's fused attention has no forward derivative on the CPU
    plain = nv.merge_and_unload(copy.deepcopy(model))
    tangent = torch.randn_like(IMAGES)
    with fwAD.dual_level():
        expected = fwAD.unpack_dual(plain(fwAD.make_dual(IMAGES, tangent))).tangent
        got = fwAD.unpack_dual(model(fwAD.make_dual(IMAGES, tangent))).tangent
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        nv.merge(model)
        merged = fwAD.unpack_dual(model(fwAD.make_dual(IMAGES, tangent))).tangent
        torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    for context in (contextlib.nullcontext, torch.no_grad):  # the values' tangents were silently ignored
        with context(), pytest.raises(RuntimeError, match="forward-mode derivative along a merged adapter's param"):
            jvp(lambda values: functional_call(model, values, (IMAGES,), strict=False), (params,),
                ({name: torch.ones_like(p) for name, p in params.items()},))
    with pytest.raises(RuntimeError, match="forward-mode derivative along a merged adapter's param"):  # batched: vmap
        jacfwd(lambda values: functional_call(model, values, (IMAGES,), strict=False))(params)
    # the input's gradient alone, its adapter's values held fixed, is the plain model's (a saliency map)
    saliency = grad(lambda images: functional_call(model, params, (images,), strict=False).logsumexp(-1).sum())
    expected = grad(lambda images: plain(images).logsumexp(-1).sum())(IMAGES)
    torch.testing.assert_close(saliency(IMAGES), expected, rtol=1e-4, atol=1e-6)


def test_a_merged_layer_refuses_a_parameter_replaced_since_and_takes_conversions_pickles_and_state_dicts():
    import copy
    import io
    model = adapted("nola").eval()
    nv.merge(model)
    expected = model(IMAGES)
    # new parameter objects from a conversion, a copy, a pickle or an assigning load are the merged ones
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.double().float()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    torch.testing.assert_close(model(IMAGES), expected)
    torch.testing.assert_close(copy.deepcopy(model)(IMAGES), expected)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(IMAGES), expected)
    other = adapted("nola").eval()
    nv.merge(other)
    other.load_state_dict(model.state_dict(), assign=True)
    torch.testing.assert_close(other(IMAGES), expected)
    # torch.export traces with stand-ins for every tensor; a DataParallel replica gets broadcast copies
    torch.testing.assert_close(torch.export.export(model, (IMAGES,)).module()(IMAGES), expected)
    layer = model.get_submodule("blocks.0.mlp.fc2")
    replica = layer._replicate_for_data_parallel()
    replica._parameters = {name: p.detach().clone() for name, p in layer._parameters.items()}
    hidden = torch.randn(2, layer.in_features)
    torch.testing.assert_close(replica(hidden), layer(hidden))
    layer.nola_alpha = torch.nn.Parameter(layer.nola_alpha.detach() * 2)
    with pytest.raises(RuntimeError, match="parameter replaced since"):
        model(IMAGES)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_a_traced_unmerged_model_gives_the_eager_outputs(key):
    """Tracing stopped at the bases' generator operator ('unsupported input type: Device')."""
    model = adapted(key).eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, IMAGES, check_trace=False)
        torch.testing.assert_close(traced(IMAGES), model(IMAGES), rtol=1e-5, atol=1e-6)
    # with gradients on (torch.jit.trace's default), the training pass's autograd functions failed inside the tracer
    # ("unordered_map::at"): the tracer records the plain ops
    traced = torch.jit.trace(model, IMAGES, check_trace=False)
    with torch.no_grad():
        torch.testing.assert_close(traced(IMAGES), model(IMAGES), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_batched_backwards_equal_one_backward_per_output(key):
    """jacobian(vectorize=True) and autograd.grad(is_grads_batched=True) run the backward under vmap, which has no
    rule for the in-place activation backward of an adapted fc2: they failed inside torch."""
    model = adapted(key).eval()
    image = IMAGES[:1]
    vectorized = torch.autograd.functional.jacobian(model, image, vectorize=True)
    torch.testing.assert_close(vectorized, torch.autograd.functional.jacobian(model, image), rtol=1e-5, atol=1e-7)
    params = [p for p in model.parameters() if p.requires_grad]
    outputs = model(IMAGES)
    units = torch.eye(outputs.shape[-1]).unsqueeze(1).expand(-1, *outputs.shape)
    batched = torch.autograd.grad(outputs, params, units, retain_graph=True, is_grads_batched=True)
    for i, unit in enumerate(units):
        for got, expected in zip(batched, torch.autograd.grad(outputs, params, unit, retain_graph=True)):
            torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-7)
