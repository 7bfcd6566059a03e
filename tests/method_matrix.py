"""The method matrix: every registered adapter method, in the variants that ``test_methods.py`` runs the whole
contract on (inject, save/load, merge, unload, peft export, serving, torch.compile).

The matrix is read from the registry when the tests are collected: ``nv.available_methods()``, with the variant
configs of ``VARIANTS`` for the methods listed there. A registered method without an entry runs once with its
config class's defaults (``nv.get_method(name).config_cls()``), so a method's default targets must name modules
of a timm ViT (``mlp.fc1``, ``attn.q``, …), as the built-in methods' do. Registering a method is therefore all
it takes to have it tested (``example_method.py`` is registered by ``conftest.py``); add an entry here only to
run more than its defaults.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from tiny_models import as_if_trained, tiny_vit

import nola_vision as nv

# Variant configs by method name. NOLA's scale makes its random coefficients move the logits well above every
# tolerance of the contract; k = l = 40 spans two chunks of the shared basis combination (32 bases each) and
# k = l = 72 two chunks of the per-layer one (64); the targets cover q/v slices, the k slice, a whole qkv-free
# projection and an fc2 that recomputes its input. LoRA adapts q and v (the paper's baseline) and fc2.
VARIANTS: Dict[str, Dict[str, Callable[[], Any]]] = {
    "nola": {
        "nola_shared": lambda: nv.NOLAConfig(rank=4, num_basis_a=40, num_basis_b=40, scale=10.0,
                                             targets=["mlp.fc1", "mlp.fc2", "attn.q", "attn.v"]),
        "nola_per_layer": lambda: nv.NOLAConfig(rank=2, num_basis_a=72, num_basis_b=72, scale=10.0, basis="per_layer",
                                                targets=["attn.k", "attn.proj"]),
    },
    "lora": {"lora_qv": lambda: nv.LoRAConfig(rank=4, targets=["attn.q", "attn.v", "mlp.fc2"])},
}

# Standard deviation of the values ``trained`` gives every trained tensor: large enough that each variant's
# adapters move the logits by over 1e-3 (checked by the matrix), a hundred times the equality tolerances.
TRAINED_SCALE = 1.0


@dataclass(frozen=True)
class Variant:
    """One row of the matrix: a registered method and a function that returns a fresh config of it."""

    id: str
    method: str
    make_config: Callable[[], Any]

    def config(self) -> Any:
        return self.make_config()

    @property
    def has_layers(self) -> bool:
        """Whether the method adds adapter layers (``linear`` and ``full`` do not)."""
        return nv.get_method(self.method).layer_cls is not None

    @property
    def trains_backbone(self) -> bool:
        return nv.get_method(self.method).config_cls.train_backbone


def method_variants() -> List[Variant]:
    """Every registered method's variants: its ``VARIANTS`` entry, or its config class's defaults."""
    variants = []
    for name in nv.available_methods():
        table = VARIANTS.get(name, {name: nv.get_method(name).config_cls})
        variants += [Variant(variant_id, name, make) for variant_id, make in table.items()]
    return variants


def trained(variant: Variant, seed: int = 0, *, num_classes: int = 5, adapters_only: bool = False,
            model: Optional[torch.nn.Module] = None) -> torch.nn.Module:
    """A tiny ViT (or ``model``) with the variant injected and its trained tensors filled as after training."""
    model = tiny_vit(num_classes) if model is None else model
    return as_if_trained(nv.inject(model, variant.config()), seed, TRAINED_SCALE, adapters_only=adapters_only)


def training_steps(model: torch.nn.Module, forward: Callable, images: torch.Tensor, steps: int = 2):
    """(logits, gradients of every trained tensor) per step, with an SGD update in between."""
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(parameters.values(), lr=0.1)
    history = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        outputs = forward(images)
        F.cross_entropy(outputs, torch.arange(len(images)) % outputs.shape[1]).backward()
        history.append((outputs.detach(), {name: p.grad.clone() for name, p in parameters.items()}))
        optimizer.step()
    return history


def assert_compiled_training_is_eager_training(variant: Variant, images: torch.Tensor, tolerance: float = 1e-5,
                                               **compile_options) -> None:
    """Two SGD steps of the compiled model give the eager logits and gradients, each within ``tolerance`` of its
    largest value. The second step runs on updated tensors and, with shared bases, on the basis codes the first
    step built (a stale value would be off by the whole update: logits move by about 1 between the steps)."""
    eager_model, compiled_model = trained(variant).train(), trained(variant).train()
    compiled = torch.compile(compiled_model, **compile_options)
    eager_steps = training_steps(eager_model, eager_model, images)
    for (expected, expected_grads), (outputs, grads) in zip(eager_steps, training_steps(compiled_model, compiled,
                                                                                        images)):
        assert grads.keys() == expected_grads.keys()
        for name, (got, want) in {"logits": (outputs, expected), **{n: (grads[n], expected_grads[n])
                                                                     for n in grads}}.items():
            error = (got - want).abs().max().item()
            assert error <= tolerance * max(want.abs().max().item(), 1e-3), f"{name}: off by {error:.2e}"
