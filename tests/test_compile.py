"""torch.compile beyond the method matrix (which compiles every variant's training step with ``aot_eager`` and
``fullgraph=True``): the basis generator is one operator in a graph, and inductor trains as eager does (slow)."""
import copy
import warnings

import pytest
import torch
from method_matrix import assert_compiled_training_is_eager_training
from tiny_models import as_if_trained, tiny_vit
from torch._dynamo.testing import CompileCounter

import nola_vision as nv
from nola_vision.core.basis import BasisSpec


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: no cached frames or recompile limits carried over from other models."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_basis_generation_is_one_operator_in_a_compiled_graph():
    # Traced op by op, the chunked hash loop would put thousands of integer ops into the graph (minutes of compiling).
    spec = BasisSpec(0, "A/64x4", (64, 4), 1024)
    explained = torch._dynamo.explain(lambda: spec.codes())()
    assert (explained.graph_break_count, explained.op_count) == (0, 1)
    assert torch.equal(torch.compile(lambda: spec.codes(), backend="aot_eager")(), spec.codes())


def test_each_adapted_layer_is_one_opaque_operator_in_a_compiled_graph(images):
    # Traced op by op, the compiler chooses what to keep for backward and kept an fc2's activation output (a
    # compiled ViT-B NOLA step peaked 1.5x eager); as one operator it keeps exactly what eager keeps.
    model = nv.inject(tiny_vit(), nv.NOLAConfig(num_basis_a=16, num_basis_b=16,
                                                targets=["attn.q", "mlp.fc1", "mlp.fc2"])).train()
    explained = torch._dynamo.explain(lambda x: model(x).sum())(images)
    ops = [str(node.target) for graph in explained.graphs for node in graph.graph.nodes]
    assert explained.graph_break_count == 0
    assert ops.count("nola_vision.low_rank_linear.default") == len(nv.adapted_layers(model)) == 6


@pytest.mark.parametrize("method", ["nola", "lora"])
def test_compiled_autocast_training_gives_the_eager_autocast_logits_and_gradients(method, images):
    # Compiled code runs without autocast's state: the operator gets the dtype autocast chose when it was traced.
    config = (nv.NOLAConfig(num_basis_a=16, num_basis_b=16) if method == "nola"
              else nv.LoRAConfig(targets=["attn.q", "attn.v", "mlp.fc2"]))
    results = []
    for compiled in (False, True):
        # a generator of its own: the first tiny_vit() of a process draws from the global one while building
        generator = torch.Generator().manual_seed(0)
        model = nv.inject(tiny_vit(), config).train()
        trained = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for p in trained:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
        forward = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = forward(images)
        logits.float().logsumexp(-1).sum().backward()
        results.append((logits, [p.grad for p in trained]))
    (eager, eager_grads), (logits, grads) = results
    assert logits.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(logits, eager, rtol=0, atol=0)
    for grad, expected in zip(grads, eager_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("method", ["nola", "lora"])
def test_compiled_training_under_gradient_checkpointing_gives_the_adapters_the_eager_gradients(method, reentrant,
                                                                                                images):
    """Under timm's re-entrant checkpointing a compiled model kept its images frozen, so every adapter got no gradient
    (only the head trained, without an error)."""
    import timm.layers

    if reentrant and not hasattr(timm.layers, "set_reentrant_ckpt"):
        pytest.skip("this timm checkpoints non-reentrantly only")
    config = nv.NOLAConfig(num_basis_a=16, num_basis_b=16) if method == "nola" else nv.LoRAConfig()
    generator = torch.Generator().manual_seed(0)
    model = nv.inject(tiny_vit(), config).train()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    eager = copy.deepcopy(model)
    eager(images).logsumexp(-1).sum().backward()
    model.set_grad_checkpointing(True)
    previous = timm.layers.use_reentrant_ckpt() if hasattr(timm.layers, "use_reentrant_ckpt") else None
    if previous is not None:
        timm.layers.set_reentrant_ckpt(reentrant)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.compile(model, backend="aot_eager")(images).logsumexp(-1).sum().backward()
    finally:
        if previous is not None:
            timm.layers.set_reentrant_ckpt(previous)
    # dynamo warned of each functools.cache it traced in our code ("silent incorrectness is a potential risk")
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    expected = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, expected[name].grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", [nv.LoRAConfig(rank=2), nv.NOLAConfig(num_basis_a=16, num_basis_b=16)])
def test_a_hook_compiled_once_without_grad_leaves_later_fullgraph_training_compiles_working(config, images):
    """A compiled pass without grad traced the re-entrant checkpointing hook to no ops, and dynamo skipped it from then
    on: it ran eagerly inside later compiled calls, where its generator expressions failed every fullgraph=True
    compile in the process ("Attempt to trace generator")."""
    served = torch.compile(nv.inject(tiny_vit(), config), backend="eager")
    with torch.no_grad():
        served(images)
    model = nv.inject(tiny_vit(), config).train()
    expected = model(images)
    logits = torch.compile(model, backend="aot_eager", fullgraph=True)(images)
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_inductor_training_steps_give_the_eager_logits_and_gradients(variant, images):
    # Inductor orders float sums its own way: first-step gradients agree to 1e-4 of their largest value, and full
    # fine-tuning's lr-0.1 step turns that into 2e-3 at the second step (still 1000 times below a stale value's error).
    assert_compiled_training_is_eager_training(variant, images, tolerance=5e-3, backend="inductor")


@pytest.mark.parametrize("head", ["linear", "normed"])
def test_compiled_quantisation_aware_training_never_recompiles_as_the_values_move(images, head):
    """Fake quantisation read each tensor's range with .item(): traced, the range became a constant of the graph, so
    every optimizer step recompiled, until dynamo's recompile limit sent the step back to eager. A head with a norm
    before its Linear shows the norm's parameters at their stored bits too."""
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        backbone = tiny_vit()
        if head == "normed":
            backbone.head = torch.nn.Sequential(torch.nn.LayerNorm(64), backbone.head)
        model = nv.inject(backbone, nv.NOLAConfig(num_basis_a=16, num_basis_b=16)).train()
        nv.set_quantization_aware(model, 4)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        counter = CompileCounter()
        forward = torch.compile(model, backend=counter) if compiled else model
        losses, frames = [], []
        for _ in range(6):
            loss = forward(images).logsumexp(-1).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            frames.append(counter.frame_count)
        runs.append((losses, frames))
    (eager, _), (losses, frames) = runs
    assert frames[0] == frames[-1]  # everything compiled in the first step, nothing after (was one frame a step)
    torch.testing.assert_close(torch.stack(losses), torch.stack(eager), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_a_compiled_model_training_at_the_bits_of_the_file_it_loaded_runs_as_eager(images, tmp_path, grad):
    """Values on their grid came back from fake quantisation as a view of themselves, which torch's check of a custom
    operator refused ('may not alias any inputs'): QAT continued from its own 4-bit file failed once compiled."""
    torch.manual_seed(0)
    trained = nv.inject(tiny_vit(), nv.NOLAConfig(rank=4, num_basis_a=24, num_basis_b=24))
    with torch.no_grad():
        for parameter in trained.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.1)
    nv.set_quantization_aware(trained, 4)
    model = nv.load_adapter(tiny_vit(), nv.save_adapter(trained, tmp_path / "task", bits=4))
    nv.set_quantization_aware(model, 4)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(torch.compile(model, backend="aot_eager")(images), model(images), rtol=0, atol=0)


@pytest.mark.parametrize("config", [nv.LoRAConfig(rank=4, targets=["attn.qkv", "mlp.fc1"]),
                                    nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8)], ids=["lora", "nola"])
def test_a_merged_model_compiled_whole_runs_with_gradients_on_and_refuses_only_a_backward(images, config):
    """The merged layers' guard raised in its backward, which dynamo traces with the forward pass: fullgraph=True
    failed on a forward pass alone ('Observed exception'), and otherwise every frame holding one ran eagerly."""
    model = nv.merge(nv.inject(tiny_vit(), config))
    images = images.clone().requires_grad_()  # a saliency map's input: gradients are on
    expected = model(images)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(images), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through a merged adapter.*nv.unmerge"):
        compiled(images).sum().backward()
    with pytest.raises(RuntimeError, match="backward through a merged adapter"):
        expected.sum().backward()


@pytest.mark.parametrize("config", [nv.LoRAConfig(rank=2), nv.NOLAConfig(num_basis_a=16, num_basis_b=16)])
def test_a_compiled_merged_training_step_is_refused_when_the_input_takes_no_gradient(images, config):
    """A training step's images take no gradient: the compiled backward then needed nothing of the refusing
    operator, dropped it and finished, the head trained and the adapter left without gradients."""
    model = nv.merge(nv.inject(tiny_vit(), config))
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.raises(RuntimeError, match="backward through a merged adapter.*nv.unmerge"):
        compiled(images).sum().backward()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_merged_pass_given_other_adapter_tensors_is_refused_as_an_eager_one(images, backend):
    """Compiled, a merged pass skipped the check that its adapter tensors are those merged: functional_call with other
    values, or a parameter replaced since merge, silently ran on the merged weight (0.14 off)."""
    from torch.func import functional_call

    model = nv.merge(as_if_trained(nv.inject(tiny_vit(), nv.LoRAConfig(rank=2))))
    with torch.no_grad():
        expected = model(images)
        own = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
        compiled = torch.compile(model, backend=backend)
        assert torch.equal(functional_call(compiled, own, (images,)), expected)  # equal copies (offload hooks) run
        with pytest.raises(RuntimeError, match="LoRALinear is merged: .* given tensors of other values"):
            functional_call(compiled, {name: 2 * p for name, p in own.items()}, (images,))
        layer = next(iter(nv.adapted_layers(model).values()))
        layer.lora_B = torch.nn.Parameter(3 * layer.lora_B.detach())
        with pytest.raises(RuntimeError, match="LoRALinear is merged: .* given tensors of other values"):
            compiled(images)


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_of_a_merged_model_given_equal_copies_of_its_adapter_tensors_gives_its_outputs(images, strict):
    """Offload hooks pass equal copies in place of the parameters: strict export failed in the merged layers' check,
    which dynamo cannot step around there (a torch.compiler.disable'd function)."""
    from torch.func import functional_call

    model = nv.merge(as_if_trained(nv.inject(tiny_vit(), nv.LoRAConfig(rank=2)), 1)).eval()
    copies = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}

    class Offloaded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return functional_call(self.model, copies, (x,), strict=False)

    with torch.no_grad():
        expected = model(images)
    exported = torch.export.export(Offloaded(), (images,), strict=strict)
    torch.testing.assert_close(exported.module()(images), expected, rtol=0, atol=1e-6)


def test_a_model_run_partly_compiled_is_not_told_its_compiled_layer_was_never_called(images):
    # Compiled code records no calls: a compiled layer under an eager parent (as after a frame dynamo gave up on, or
    # a recompile limit, which a 12-block model's per-block hooks reached) was blamed for reading its weight directly.
    model = nv.inject(tiny_vit(), nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8))
    expected = copy.deepcopy(model)
    fc1 = model.blocks[0].mlp.fc1
    fc1.compile(backend="eager")
    with torch.no_grad():
        assert torch.equal(model(images), expected(images))
        assert torch.equal(model(images), expected(images))
        fc1._compiled_call_impl = None  # eager again: its parent's next pass is judged, and the check completes
        assert torch.equal(model(images), expected(images))
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.blocks.modules())


def test_an_adapter_the_attention_never_calls_is_still_refused_eagerly_after_torch_export():
    # Exporting traces the model's Python code (torch.compiler.is_compiling() holds there): a check that stopped for
    # good after any traced hook let the eager passes after it through.
    from test_timm_families import LORA_QKV, eva02

    model = nv.inject(eva02(), LORA_QKV)
    images = torch.randn(1, 3, 28, 28)
    torch.export.export(model, (images,))
    with pytest.raises(ValueError, match="blocks.0.attn.qkv was never called although its parent EvaAttention ran"):
        model(images)


def _checkpoint_wrapper(module: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    return checkpoint_wrapper(module)


@pytest.mark.parametrize("wrap, inner", [(torch.compile, "_orig_mod"),
                                         (_checkpoint_wrapper, "_checkpoint_wrapped_module")])
def test_a_block_wrapped_inside_the_model_is_refused_where_names_are_recorded(wrap, inner, tmp_path):
    # Its layers' names carry the wrapper's own (blocks.0._orig_mod.attn.qkv): a file saved so did not load onto the
    # plain model, a peft export silently left block 0 unadapted, and a load blamed a constructor setting.
    config = nv.LoRAConfig(rank=2, targets=["attn.q", "mlp.fc1"])
    task = nv.save_adapter(nv.inject(tiny_vit(), config), tmp_path / "task")
    model = nv.inject(tiny_vit(), config)
    model.blocks[0] = wrap(model.blocks[0])
    message = (rf"blocks.0 is wrapped by .*'{inner}\.'.*put back the module it wraps: "
               rf"model.blocks\[0\] = model.blocks\[0\].{inner}")
    for name, call in [("save_adapter", lambda: nv.save_adapter(model, tmp_path / "saved")),
                       ("export_peft", lambda: nv.export_peft(model, tmp_path / "peft")),
                       ("export_onnx", lambda: nv.export_onnx(model, tmp_path / "g.onnx", tasks_as_inputs=True)),
                       ("load_adapter", lambda: nv.load_adapter(model, task)),
                       ("MultiTaskModel", lambda: nv.MultiTaskModel(model))]:
        with pytest.raises(ValueError, match=rf"nv.{name}: {message}"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["task"]
    model.blocks[0] = getattr(model.blocks[0], inner)  # as the message says: then the names are the plain model's
    nv.load_adapter(model, nv.save_adapter(model, tmp_path / "saved"))
    if wrap is torch.compile:
        model.blocks[0].compile()  # in place: the names stay
        nv.load_adapter(model, nv.save_adapter(model, tmp_path / "saved"))
