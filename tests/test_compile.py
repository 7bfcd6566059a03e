"""torch.compile: adapted ViTs trace without graph breaks in nola_vision and train exactly as in eager mode."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_vit

import nola_vision as nv
from nola_vision.core.basis import BasisSpec

PACKAGE = str(Path(nv.__file__).resolve().parent)
# k = l = 96 spans several chunks of the basis combination (32 shared, 64 per layer), as k = 1024 does.
CONFIGS = {
    "nola_shared": lambda: nv.NOLAConfig(rank=4, num_basis_a=96, num_basis_b=96, targets=["mlp.fc1", "mlp.fc2"]),
    "nola_per_layer": lambda: nv.NOLAConfig(rank=4, num_basis_a=96, num_basis_b=96, targets=["mlp.fc1", "mlp.fc2"],
                                            basis="per_layer"),
    "lora_qv": lambda: nv.LoRAConfig(rank=4, targets=["attn.q", "attn.v"]),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: no cached frames or recompile limits carried over from other models."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=generator), torch.tensor([0, 1, 2, 3])


def _adapted(method: str) -> torch.nn.Module:
    """A tiny adapted ViT in training mode with non-trivial adapter values (LoRA's B starts at zero)."""
    model = nv.inject(tiny_vit(), CONFIGS[method]()).train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    return model


def _graph_breaks(model: torch.nn.Module):
    images, labels = _batch()
    return torch._dynamo.explain(lambda x, y: F.cross_entropy(model(x), y))(images, labels)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_forward_and_loss_trace_without_graph_breaks_in_adapter_code(method):
    explained = _graph_breaks(_adapted(method))
    inside = [(reason.reason.splitlines()[0], frame.filename, frame.lineno) for reason in explained.break_reasons
              for frame in reason.user_stack if frame.filename.startswith(PACKAGE)]
    assert inside == []
    # Some breaks (e.g. in a forward hook) abandon a frame without a reason: count them against the plain model.
    assert explained.graph_break_count == _graph_breaks(tiny_vit().train()).graph_break_count


def test_basis_generation_is_one_operator_in_a_compiled_graph():
    # Traced op by op, the chunked hash loop would put thousands of integer ops into the graph (minutes of compiling).
    spec = BasisSpec(0, "A/64x4", (64, 4), 1024)
    explained = torch._dynamo.explain(lambda: spec.codes())()
    assert (explained.graph_break_count, explained.op_count) == (0, 1)
    assert torch.equal(torch.compile(lambda: spec.codes(), backend="aot_eager")(), spec.codes())


def _training_steps(model: torch.nn.Module, forward, steps: int = 2):
    """(loss, gradients of every trainable parameter) per step, with an SGD update in between."""
    images, labels = _batch()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(trainable.values(), lr=0.5)
    history = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(images), labels)
        loss.backward()
        history.append((loss.detach(), {name: p.grad.clone() for name, p in trainable.items()}))
        optimizer.step()
    return history


def _assert_same_training(method: str, backend: str, steps: int) -> None:
    eager_model, compiled_model = _adapted(method), _adapted(method)
    eager = _training_steps(eager_model, eager_model, steps)
    compiled = _training_steps(compiled_model, torch.compile(compiled_model, backend=backend), steps)
    for (eager_loss, eager_grads), (loss, grads) in zip(eager, compiled):
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == eager_grads.keys() and any("head" in name for name in grads)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, eager_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_compiled_training_step_gives_the_eager_loss_and_gradients(method):
    # Two steps: the second runs on updated coefficients and, for shared bases, with the basis codes already built.
    _assert_same_training(method, "aot_eager", steps=2)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nola_shared", "lora_qv"])
def test_inductor_training_step_gives_the_eager_loss_and_gradients(method):
    _assert_same_training(method, "inductor", steps=2)
