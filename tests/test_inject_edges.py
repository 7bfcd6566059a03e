"""inject on the edges of what models do: copies, other call paths, hooked or stateful activations, wrappers, re-entrant
checkpointing with other input forms, parametrized layers, and configs that could never train."""
import copy
import io
import re
import warnings
from functools import partial

import pytest
import timm
import timm.layers
import torch
from tiny_models import TINY_VIT, as_if_trained, tiny_vit
from torch import nn
from torch.nn.utils import prune

import nola_vision as nv
from nola_vision.core.inject import adapter_state

SMALL_NOLA = dict(rank=2, num_basis_a=8, num_basis_b=8)


def _eva_with_lora_on_qkv() -> nn.Module:
    # EvaAttention reads qkv.weight with F.linear when it has a qkv bias: an adapter there is never called.
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1, embed_dim=32,
                              num_heads=2, num_classes=3)
    return nv.inject(model, nv.LoRAConfig(rank=2, targets=["attn.qkv"]))


@pytest.mark.parametrize("how", ["deepcopy", "torch.save", "forward_features"])
def test_an_adapter_that_is_never_called_is_refused_in_copies_and_on_every_call_path(how):
    model = _eva_with_lora_on_qkv()
    if how == "deepcopy":
        model = copy.deepcopy(model)
    elif how == "torch.save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        model = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    images = torch.randn(1, 3, 28, 28)
    with torch.no_grad(), pytest.raises(ValueError, match="blocks.0.attn.qkv was never called although its parent"):
        model.forward_features(images) if how == "forward_features" else model(images)


def test_the_call_check_removes_its_hooks_once_every_parent_passed(images):
    model = nv.inject(tiny_vit(), nv.LoRAConfig(targets=["attn.qkv", "mlp.fc2"]))
    hooked = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.blocks.modules())  # noqa: E731
    before = hooked()
    with torch.no_grad():
        model(images)
    assert before > 0 and hooked() == 0


def test_an_activation_with_hooks_parameters_or_in_place_stays_in_the_mlp(images):
    hooked = tiny_vit()
    mask = (torch.arange(hooked.blocks[0].mlp.fc1.out_features) % 2).float()
    for block in hooked.blocks:
        block.mlp.act.register_forward_hook(lambda module, args, out: out * mask)
    stateful, in_place = tiny_vit(act_layer=nn.PReLU), tiny_vit(act_layer=partial(nn.ReLU, inplace=True))
    plain_keys = set(stateful.state_dict())
    for model in (hooked, stateful, in_place):
        nv.inject(model, nv.LoRAConfig(targets=["mlp.fc2"]))
        assert model.blocks[0].mlp.fc2.input_activation is None
    assert {key for key in stateful.state_dict()
            if "lora" not in key and "merged" not in key and not key.endswith("._extra_state")} == plain_keys
    # the hooked mask holds in backward too: the same gradients as without the takeover
    reference = tiny_vit()
    for block in reference.blocks:
        block.mlp.act.register_forward_hook(lambda module, args, out: out * mask)
    nv.inject(reference, nv.LoRAConfig(targets=["mlp.fc2"], recompute_activation=False))
    grads = []
    for model in (hooked, reference):
        as_if_trained(model, 1, scale=0.3, adapters_only=True)
        model(images).square().sum().backward()
        grads.append(model.blocks[0].mlp.fc2.lora_A.grad)
    torch.testing.assert_close(grads[0], grads[1])
    in_place(images).sum().backward()  # an in-place activation would overwrite the kept pre-activation


def test_hooks_added_after_inject_on_a_taken_over_activation_run_on_its_output_or_are_warned_about(images):
    model = as_if_trained(nv.inject(tiny_vit(), nv.LoRAConfig(targets=["mlp.fc2"])), 1, adapters_only=True)
    reference = as_if_trained(nv.inject(tiny_vit(), nv.LoRAConfig(targets=["mlp.fc2"], recompute_activation=False)), 1,
                              adapters_only=True)
    mask = (torch.arange(model.blocks[0].mlp.fc1.out_features) % 2).float()
    model.blocks[0].mlp.fc2.input_activation.register_forward_hook(lambda module, args, out: out * mask)
    reference.blocks[0].mlp.act.register_forward_hook(lambda module, args, out: out * mask)
    grads = []
    for m in (model, reference):  # the hook's mask holds in backward too: the activation is kept, not recomputed
        m(images).square().sum().backward()
        grads.append(m.blocks[0].mlp.fc2.lora_A.grad)
    torch.testing.assert_close(grads[0], grads[1])
    model.blocks[1].mlp.act.register_forward_hook(lambda module, args, out: None)  # a summary tool's hook
    with pytest.warns(UserWarning, match="hook on mlp.act, whose activation the adapted mlp.fc2 computes"):
        model(images)
    with pytest.warns(UserWarning, match=r"unload drops the hooks registered on blocks.1.mlp.act after inject"):
        nv.unload(model)  # they were on the placeholder, which unload replaces by the activation: gone silently
    assert isinstance(model.blocks[1].mlp.act, nn.GELU) and not model.blocks[1].mlp.act._forward_hooks


def test_unload_warning_of_dropped_stand_in_hooks_as_an_error_leaves_the_model_whole(images):
    # warned inside the loop over layers: under -W error unload stopped after giving back 3 of 4 layers, leaving a model
    # that ran, merged and counted as adapted with one adapter left
    model = nv.inject(tiny_vit(), nv.NOLAConfig(targets=["mlp.fc1", "mlp.fc2"]))
    model.blocks[1].mlp.act.register_forward_hook(lambda module, args, out: None)
    before = model(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for remove in (nv.unload, nv.merge_and_unload):
            with pytest.raises(UserWarning, match=r"unload drops the hooks registered on blocks.1.mlp.act"):
                remove(model)
    assert len(nv.adapted_layers(model)) == 4 and adapter_state(model) is not None
    assert not any(layer.merged for layer in nv.adapted_layers(model).values())
    torch.testing.assert_close(model(images), before, rtol=0, atol=0)
    with pytest.warns(UserWarning, match=r"unload drops the hooks registered on blocks.1.mlp.act"):
        nv.unload(model)
    assert not nv.adapted_layers(model) and adapter_state(model) is None


class _Wrapper(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.backbone = tiny_vit(num_classes)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.backbone(batch["image"])


def test_a_wrapped_timm_model_trains_its_head_and_a_headless_linear_probe_is_refused():
    wrapped = nv.inject(_Wrapper(), nv.NOLAConfig(**SMALL_NOLA))
    assert wrapped.backbone.head.weight.requires_grad
    assert nv.count_parameters(wrapped)["head"] == 5 * 64 + 5
    with pytest.raises(ValueError, match="'linear' would train nothing: .* has no classifier head"):
        nv.inject(tiny_vit(num_classes=0), "linear")
    two = nn.ModuleDict({"student": tiny_vit(), "teacher": tiny_vit()})
    with pytest.raises(ValueError, match=r"holds 2 timm models with classifier heads \(student, teacher\)"):
        nv.inject(two, nv.NOLAConfig(**SMALL_NOLA))
    encoders = nn.ModuleDict({"image": tiny_vit(num_classes=0), "crop": tiny_vit(num_classes=0)})  # headless: fine
    assert nv.count_parameters(nv.inject(encoders, nv.NOLAConfig(**SMALL_NOLA)))["head"] == 0


@pytest.mark.parametrize("call", ["keyword", "dict batch"])
def test_reentrant_checkpointing_trains_the_adapters_whatever_form_the_images_come_in(images, call):
    if not hasattr(timm.layers, "set_reentrant_ckpt"):
        pytest.skip("this timm checkpoints non-reentrantly only")
    model = nv.inject(_Wrapper() if call == "dict batch" else tiny_vit(), nv.NOLAConfig(**SMALL_NOLA)).train()
    (model.backbone if call == "dict batch" else model).set_grad_checkpointing(True)
    timm.layers.set_reentrant_ckpt(True)
    try:
        out = model({"image": images}) if call == "dict batch" else model(x=images)
        out.square().sum().backward()
    finally:
        timm.layers.set_reentrant_ckpt(False)
    grads = [layer.nola_alpha.grad for layer in nv.adapted_layers(model).values()]
    assert all(grad is not None and grad.abs().sum() > 0 for grad in grads)


def test_a_forward_pass_whose_backward_never_comes_leaves_no_stale_factors(images):
    model = nv.inject(tiny_vit(), nv.NOLAConfig(**SMALL_NOLA)).train()
    model.set_grad_checkpointing(True)
    model(images)  # in grad mode under checkpointing: its factors wait for a backward pass
    with torch.no_grad():
        for layer in nv.adapted_layers(model).values():
            layer.nola_alpha.add_(0.5)
    layer = model.blocks[0].mlp.fc1
    batched = layer.get_delta_weight()
    layer.batched_factors = None
    torch.testing.assert_close(batched, layer.get_delta_weight())
    copy.deepcopy(model)  # the kept factors belong to an autograd graph, which deepcopy cannot copy


@pytest.mark.parametrize("tensor", ["weight", "bias"])
@pytest.mark.parametrize("kind", ["prune", "weight_norm"])
def test_a_linear_whose_weight_a_pre_hook_computes_is_refused_naming_the_fix(kind, tensor):
    """Pruning and the legacy weight_norm turn the weight into a plain tensor that a pre-hook recomputes: inject
    failed with a bare KeyError holding a memory address."""
    model = tiny_vit()
    fc1 = model.blocks[0].mlp.fc1
    if kind == "prune":
        prune.l1_unstructured(fc1, tensor, amount=0.5)
    else:
        nn.utils.weight_norm(fc1, tensor)
    for config in (nv.NOLAConfig(rank=2, num_basis_a=6, num_basis_b=4), nv.LoRAConfig(rank=2, targets=["mlp.fc1"])):
        with pytest.raises(ValueError, match=rf"target blocks.0.mlp.fc1's {tensor} is no parameter but computed "
                                             r"before each call .*prune.remove\(module, 'weight'\)"):
            nv.inject(model, config)
    assert nv.adapted_layers(model) == {}


def test_a_target_whose_weight_was_set_to_none_is_refused_by_name():
    """inject failed with a bare KeyError holding a memory address."""
    model = tiny_vit()
    model.blocks[1].mlp.fc2.weight = None
    with pytest.raises(ValueError, match="target blocks.1.mlp.fc2 has no weight"):
        nv.inject(model, nv.NOLAConfig(**SMALL_NOLA, targets=["mlp.fc1", "mlp.fc2"]))
    assert nv.adapted_layers(model) == {}


def test_a_parametrized_linear_and_a_zero_scale_are_refused():
    model = tiny_vit()
    nn.utils.parametrizations.weight_norm(model.blocks[0].mlp.fc1)
    with pytest.raises(ValueError, match="blocks.0.mlp.fc1 has parametrized tensors"):
        nv.inject(model, nv.NOLAConfig(**SMALL_NOLA))
    assert not nv.adapted_layers(model)
    with pytest.raises(ValueError, match="NOLAConfig.scale is 0"):
        nv.NOLAConfig(scale=0)
    with pytest.raises(ValueError, match="LoRAConfig.alpha is 0"):
        nv.LoRAConfig(alpha=0.0)
    # scaled in float32, these made ΔW and every gradient exactly zero as well, without a word
    for config, field in ((lambda v: nv.NOLAConfig(scale=v), "NOLAConfig.scale"),
                          (lambda v: nv.LoRAConfig(alpha=v), "LoRAConfig.alpha")):
        for value in (1e-300, -1e-45):
            with pytest.raises(ValueError, match=rf"{field} is {value:g}, over rank 4 {value / 4:g}, below float32's "
                                                 "smallest normal number"):
                config(value)
        config(1e-30)  # small but a float32 number: accepted
    # a normal number divided by the rank where it applies: the gradients of rank 64 were exactly zero as well
    for config in (lambda: nv.NOLAConfig(scale=1.2e-38, rank=64), lambda: nv.LoRAConfig(alpha=3e-38, rank=64)):
        with pytest.raises(ValueError, match=r"over rank 64 \S+, below float32's smallest normal number"):
            config()
    assert nv.NOLAConfig(scale=1.2e-36, rank=64).scaling > torch.finfo(torch.float32).tiny


def test_targets_that_cannot_fit_say_why():
    with pytest.raises(ValueError, match="ResNet has no nn.Linear layer outside its classifier head"):
        nv.create_model("resnet10t", adapter="nola", pretrained=False)
    with pytest.raises(ValueError, match="outside its classifier head, which every method trains in full"):
        nv.inject(tiny_vit(), nv.LoRAConfig(targets=["head"]))
    with pytest.raises(ValueError, match="comes with NOLA adapters .* pass adapter= with the plain model "
                                         "\\('vit_tiny_patch16_224'\\)"):
        nv.create_model("vit_tiny_patch16_224_nola", adapter="lora", pretrained=False, **TINY_VIT)
    # a regex written as a suffix: the layers it names were listed, with nothing saying why it matched none of them
    with pytest.raises(ValueError, match=r"A regex matches the whole dotted name: '\.\*\\\.mlp.fc\[12\]' selects "
                                         r"blocks.\*.mlp.fc1, blocks.\*.mlp.fc2\. Its Linear layers"):
        nv.inject(tiny_vit(), nv.LoRAConfig(targets=[r"mlp.fc[12]"]))
    # the hint is a pattern that selects what it says: an alternation grouped (ungrouped, '.*' bound to the first
    # alternative only: 'attn.q|mlp.fc1' adapted q alone), a fused qkv's thirds among what it selects
    for pattern, said, selected in (
            ("mlp.fc1|mlp.fc2", {"mlp.fc1", "mlp.fc2"}, {"mlp.fc1": ((0, 256),), "mlp.fc2": ((0, 64),)}),
            ("attn.q|mlp.fc1", {"attn.q", "mlp.fc1"}, {"attn.qkv": ((0, 64),), "mlp.fc1": ((0, 256),)}),
            ("attn.[qv]", {"attn.q", "attn.v"}, {"attn.qkv": ((0, 64), (128, 192))})):
        with pytest.raises(ValueError, match="A regex matches the whole dotted name") as refused:
            nv.inject(tiny_vit(), nv.LoRAConfig(targets=[pattern]))
        hint = re.search(r"name: '(.*?)' selects (.*?)\. Its", str(refused.value))
        assert {name.replace("blocks.*.", "") for name in hint.group(2).split(", ")} == said
        model = nv.inject(tiny_vit(), nv.LoRAConfig(targets=[hint.group(1)]))
        assert {name.replace("blocks.0.", ""): layer.slices for name, layer in nv.adapted_layers(model).items()
                if name.startswith("blocks.0.")} == selected
    with pytest.raises(ValueError, match=r"the model is itself an nn.Linear.* \(nn.Sequential\(linear\)"):
        nv.inject(nn.Linear(8, 8), nv.LoRAConfig(targets=["x"]))  # listed no layers: "Its Linear layers are: "
    # a ViT built without blocks was said to be made of convolutions or fused ops
    with pytest.raises(ValueError, match=r"VisionTransformer has no blocks \(built with depth 0\?\)"):
        nv.inject(tiny_vit(depth=0), nv.NOLAConfig())


@pytest.mark.parametrize("targets", [[""], [".*"]])
def test_a_target_matching_a_linear_model_itself_says_the_model_is_an_nn_linear(targets):
    # "" and ".*" matched the model itself (module name ""), refused as sharing its weight with "weight" (tied weights)
    for config in (nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8, targets=targets),
                   nv.LoRAConfig(targets=targets)):
        with pytest.raises(ValueError, match=r"the model is itself an nn.Linear.* \(nn.Sequential\(linear\)"):
            nv.inject(nn.Linear(4, 4), config)


def test_a_data_parallel_model_saves_and_switches_its_adapter_but_takes_new_adapters_only_unwrapped(tmp_path, images):
    # DataParallel (CPU: runs the module itself) stands for DistributedDataParallel: both took the parameters when built
    trained = as_if_trained(nv.inject(tiny_vit(), nv.NOLAConfig(**SMALL_NOLA)), 1)
    nv.save_adapter(nn.DataParallel(trained), tmp_path / "task", bits=32)  # the inner module's names (no "module.")
    with pytest.raises(ValueError, match=r"is \(or holds\) a DataParallel, which took its parameters when it was"):
        nv.load_adapter(nn.DataParallel(tiny_vit()), tmp_path / "task")
    for wrapped in (nn.DataParallel(tiny_vit()), nn.Sequential(nn.DataParallel(tiny_vit()))):  # inside a module too
        with pytest.raises(ValueError, match=r"is \(or holds\) a DataParallel"):
            nv.inject(wrapped, nv.NOLAConfig(**SMALL_NOLA))
    with pytest.raises(ValueError, match=r"its submodule '0' does .* save_adapter\(model.get_submodule\('0'\)"):
        nv.save_adapter(nn.Sequential(trained), tmp_path / "other")
    served = nn.DataParallel(nv.inject(tiny_vit(), nv.NOLAConfig(**SMALL_NOLA)))
    nv.verify_adapter(served, tmp_path / "task")
    nv.load_adapter(served, tmp_path / "task")  # a task switch copies in place: the wrapper keeps the same tensors
    with torch.no_grad():
        torch.testing.assert_close(served(images), trained(images))
    assert nv.unload(served) is served and not nv.adapted_layers(served)  # through the wrapper, which it returns


def test_adapters_are_not_removed_through_distributed_data_parallel(tmp_path, images):
    """DDP keeps the parameters it was built with: after unload through it, its next forward pass failed on an
    internal assert of torch's reducer. The model inside it unloads."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(nv.inject(tiny_vit(), nv.NOLAConfig(**SMALL_NOLA)))
        for remove in (nv.unload, nv.merge_and_unload):
            with pytest.raises(ValueError, match=r"DistributedDataParallel, which holds the adapter tensors it was "
                                                 r"built with.*\(wrapper.module\)"):
                remove(ddp)
        ddp(images).sum().backward()  # untouched
        assert not nv.adapted_layers(nv.unload(ddp.module))
    finally:
        dist.destroy_process_group()


def test_the_call_check_keeps_each_threads_calls_apart():
    # DataParallel's replicas (and threaded servers) run one parent in several threads: a second thread entering it
    # must not wipe the calls the first made, or the first is told its adapter was never called
    import threading

    model = nv.inject(tiny_vit(), nv.LoRAConfig(targets=["mlp.fc1", "mlp.fc2"]))
    mlp = model.blocks[0].mlp
    check = next(hook.func.__self__ for hook in mlp._forward_pre_hooks.values() if isinstance(hook, partial))
    inside, entered, errors = threading.Event(), threading.Event(), []

    def first() -> None:
        try:
            check.parent_starts("blocks.0.mlp", mlp, ())
            for name in ("blocks.0.mlp.fc1", "blocks.0.mlp.fc2"):
                check.layer_called(name, None, (), None)
            inside.set()
            entered.wait(10)
            check.parent_ends("blocks.0.mlp", mlp, (), None)
        except ValueError as error:
            errors.append(error)

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(10)
    check.parent_starts("blocks.0.mlp", mlp, ())  # the second thread enters before the first leaves
    entered.set()
    thread.join()
    assert errors == []


class EncoderLayerModel(nn.Module):
    """torch's own TransformerEncoderLayer with a head: its inference fast path reads linear1/linear2's weights."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 3)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


ENCODER_TARGETS = ["linear1", "linear2"]


@pytest.mark.parametrize("config", [nv.LoRAConfig(rank=2, targets=ENCODER_TARGETS),
                                    nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8, targets=ENCODER_TARGETS)])
def test_adapters_inside_a_transformer_encoder_layer_run_on_every_inference_call(config):
    """Once the call check had passed and removed its hooks, torch's fast path (which runs only while no child has
    hooks) read linear1/linear2's frozen weights itself: from the second no-grad call on, the adapters were skipped."""
    torch.manual_seed(0)
    model = as_if_trained(nv.inject(EncoderLayerModel(), config), adapters_only=True).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        outputs = [model(x) for _ in range(3)]
        expected = nv.merge_and_unload(copy.deepcopy(model))(x)
    for output in outputs:
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    nv.unload(model)
    assert not model.encoder.linear1._forward_pre_hooks and not model.encoder.linear2._forward_pre_hooks


@pytest.mark.parametrize("quant_bits", [None, 8])
def test_a_model_whose_head_was_reset_after_inject_copies_and_saves_whole(quant_bits):
    # The hooks left on the replaced head could not be unpickled: deepcopy failed, and torch.save wrote a model that
    # torch.load refused.
    model = as_if_trained(nv.inject(tiny_vit(), nv.NOLAConfig(num_basis_a=8, num_basis_b=8)))
    if quant_bits is not None:
        nv.set_quantization_aware(model, quant_bits)
    model.reset_classifier(7)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images)
        for copied in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
            assert torch.equal(copied(images), expected)
            nv.unload(copied)


@pytest.mark.parametrize("cut", ["truncated", "block shared"])
def test_a_model_whose_adapted_block_was_cut_off_or_replaced_copies_saves_and_loads(cut):
    """The check that adapted layers are called kept handles on the removed block's hooks: deepcopy, and torch.load
    of a saved model, failed with "cannot create weak reference to 'NoneType' object"."""
    model = nv.inject(tiny_vit(), nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8, targets=["mlp.fc1"]))
    if cut == "truncated":
        model.blocks = model.blocks[:1]
    else:
        model.blocks[1] = model.blocks[0]
    images = torch.randn(2, 3, 32, 32)
    expected = model(images)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert torch.equal(copied(images), expected)


def test_inject_takes_a_method_name_as_create_model_and_the_classifier_do():
    """inject(model, "nola") was refused ("use ... one of ['linear', 'full']") where create_model took it."""
    for name, config in (("nola", nv.NOLAConfig()), ("LoRA", nv.LoRAConfig()), ("Linear", "linear")):
        assert adapter_state(nv.inject(tiny_vit(), name)).config == config
    with pytest.raises(ValueError, match=r"unknown adapter 'nolla': use 'lora', 'nola', 'linear', 'full'"):
        nv.inject(tiny_vit(), "nolla")


@pytest.mark.parametrize("method, first", [("lora", "head.weight"), ("full", "cls_token")])
def test_a_model_built_under_inference_mode_is_refused_before_inject_changes_it(method, first):
    # was: torch's "Setting requires_grad=True on inference tensor" halfway, every parameter left frozen
    with torch.inference_mode():
        model = tiny_vit()
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=rf"parameter {first} is an inference tensor .*build the model outside "
                                         r"inference_mode, or inject inside it to serve only"):
        nv.inject(model, method)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert not nv.adapted_layers(model)
    with torch.inference_mode():  # serving only: allowed
        assert nv.inject(model, "lora")(torch.zeros(1, 3, 32, 32)).shape == (1, 5)


@pytest.mark.parametrize("method", ["lora", "nola", "linear"])
@pytest.mark.parametrize("unload", [nv.unload, nv.merge_and_unload])
def test_a_model_cast_inside_inference_mode_unloads_whole(method, unload):
    # torch refused requires_grad=True on its inference tensors halfway through unload: the layers were given back,
    # the state and most flags not, and neither unload nor inject took the model again
    images = torch.randn(2, 3, 32, 32)
    plain = tiny_vit()
    model = as_if_trained(nv.inject(copy.deepcopy(plain), method), adapters_only=True)
    with torch.no_grad():
        expected = unload(copy.deepcopy(model).half())(images.half())
    with torch.inference_mode():
        model.half()
    unload(model)
    assert adapter_state(model) is None and not nv.adapted_layers(model)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == {
        name: p.requires_grad for name, p in plain.named_parameters()}
    with torch.inference_mode():
        assert torch.equal(model(images.half()), expected)


@pytest.mark.parametrize("config", [nv.LoRAConfig(rank=2, targets=["attn.qkv"]), nv.NOLAConfig(**SMALL_NOLA),
                                    nv.NOLAConfig(**SMALL_NOLA, basis="per_layer")], ids=["lora", "nola", "per_layer"])
def test_inject_under_a_meta_default_device_adapts_the_model_as_anywhere_else(config):
    # LoRA drew lora_A on torch's default device: on meta, "Cannot copy out of meta tensor", the model left frozen
    reference = nv.inject(tiny_vit(), config)
    model = tiny_vit()
    with torch.device("meta"):
        nv.inject(model, config)
    assert all(not value.is_meta for value in model.state_dict().values())
    expected = reference.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())


def test_a_failed_inject_leaves_the_model_as_it_was(monkeypatch):
    # the model was frozen before the layers were built: a layer that failed to build left it frozen, unadapted
    from nola_vision.methods.lora import layer

    model = tiny_vit()
    built, real = [], layer.portable_uniform

    def fails_at_the_third(*args, **kwargs):
        built.append(args[1])
        if len(built) == 3:
            raise MemoryError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(layer, "portable_uniform", fails_at_the_third)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(MemoryError):
        nv.inject(model, nv.LoRAConfig(rank=2, targets=["attn.qkv", "mlp.fc1"]))
    assert not nv.adapted_layers(model) and adapter_state(model) is None
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    monkeypatch.undo()
    nv.inject(model, nv.LoRAConfig(rank=2, targets=["attn.qkv", "mlp.fc1"]))  # and it can be adapted afterwards
