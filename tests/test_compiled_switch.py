"""Switching the task of a torch.compile'd model: load_adapter copies the trained tensors into the model's own
parameters, so the compiled graphs stay valid (no recompilation) and give each task's eager outputs."""
from pathlib import Path

import pytest
import torch
from tiny_models import as_if_trained, tiny_vit
from torch._dynamo.testing import CompileCounter

import nola_vision as nv

# k = l = 96 spans several chunks of the shared-basis combination, as k = 1024 does.
CONFIGS = {
    "nola_shared": lambda: nv.NOLAConfig(rank=4, num_basis_a=96, num_basis_b=96, targets=["mlp.fc1", "mlp.fc2"]),
    "lora_qv": lambda: nv.LoRAConfig(rank=4, targets=["attn.q", "attn.v"]),
}
SWITCHES = 20


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: no cached frames or recompile limits carried over from other models."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tasks(method: str, root: Path) -> list:
    """Three saved tasks of one config: adapters and heads with distinct trained values."""
    return [nv.save_adapter(as_if_trained(nv.inject(tiny_vit(), CONFIGS[method]()), seed=seed, scale=0.1),
                            root / f"task{seed}") for seed in range(3)]


def _eager_logits(task: Path, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return nv.load_adapter(tiny_vit(), task)(images)


# (merged, load_adapter called on): the compiled wrapper or the module it wraps; a merged model switches in place too.
CASES = {"unmerged_via_compiled": (False, "compiled"), "unmerged_via_module": (False, "module"),
         "merged_via_compiled": (True, "compiled")}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", list(CONFIGS))
def test_twenty_task_switches_of_a_compiled_model_never_recompile(method, case, images, tmp_path):
    merged, through = CASES[case]
    tasks = _tasks(method, tmp_path)
    expected = [_eager_logits(task, images) for task in tasks]
    model = nv.load_adapter(tiny_vit(), tasks[0])
    if merged:
        nv.merge(model)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():  # shared bases compile once more after the first pass has generated their codes
        compiled(images)
        compiled(images)
    frames = counter.frame_count
    parameters = dict(model.named_parameters())
    for index in range(1, SWITCHES + 1):
        nv.load_adapter(compiled if through == "compiled" else model, tasks[index % 3])
        with torch.no_grad():
            logits = compiled(images)
        torch.testing.assert_close(logits, expected[index % 3], rtol=1e-4, atol=1e-5)
    assert frames > 0 and counter.frame_count == frames
    assert all(parameter is parameters[name] for name, parameter in model.named_parameters())
    assert all(layer.merged == merged for layer in nv.adapted_layers(model).values())


def test_load_adapter_onto_a_compiled_plain_model_adapts_the_module_it_wraps(images, tmp_path):
    task = _tasks("nola_shared", tmp_path)[1]
    model = tiny_vit()
    compiled = torch.compile(model, backend="eager")
    assert nv.load_adapter(compiled, task) is compiled
    assert set(nv.adapted_layers(model)) == {f"blocks.{i}.mlp.{fc}" for i in range(2) for fc in ("fc1", "fc2")}
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), _eager_logits(task, images), rtol=1e-4, atol=1e-5)


def test_a_compiled_model_saves_an_adapter_that_loads_onto_a_plain_model(images, tmp_path):
    model = as_if_trained(nv.inject(tiny_vit(), CONFIGS["nola_shared"]()), seed=5, scale=0.1)
    nv.save_adapter(torch.compile(model, backend="eager"), tmp_path / "task", bits=32)
    with torch.no_grad():
        torch.testing.assert_close(_eager_logits(tmp_path / "task", images), model(images), rtol=1e-4, atol=1e-5)
