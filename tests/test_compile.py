"""torch.compile beyond the method matrix (which compiles every variant's training step with ``aot_eager`` and
``fullgraph=True``): the basis generator is one operator in a graph, and inductor trains as eager does (slow)."""
import pytest
import torch
from method_matrix import assert_compiled_training_is_eager_training

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


@pytest.mark.slow
def test_inductor_training_steps_give_the_eager_logits_and_gradients(variant, images):
    assert_compiled_training_is_eager_training(variant, images, backend="inductor")
