"""Injection misuse that used to pass silently or fail deep inside torch: a plan made on another model, dropout or a
norm put between an activation and the fc2 that took it over, and seeds beyond torch's int64 range."""
import warnings

import pytest
import timm
import torch
from tiny_models import as_if_trained, tiny_vit
from torch import nn

import nola_vision as nv
from nola_vision.core import plan

SMALL_NOLA = dict(rank=2, num_basis_a=6, num_basis_b=4, seed=1)


def test_a_plan_made_on_a_shallower_model_is_refused_and_one_made_on_this_model_saves_and_loads(images, tmp_path):
    config = nv.NOLAConfig(**SMALL_NOLA, targets=["mlp.fc1"])
    model = tiny_vit(depth=3)
    with pytest.raises(ValueError, match=r"blocks\.2\.mlp\.fc1.*plan_injection\(model, config\)"):
        nv.inject(model, nv.plan_injection(tiny_vit(depth=2), config))
    assert not hasattr(model, "nola_adapter") and not nv.adapted_layers(model)  # nothing changed

    nv.inject(model, nv.plan_injection(tiny_vit(depth=3), config))  # a plan from the same architecture fits
    assert sorted(nv.adapted_layers(model)) == [f"blocks.{i}.mlp.fc1" for i in range(3)]
    as_if_trained(model, 1)
    nv.save_adapter(model, tmp_path / "a", bits=32)
    fresh = nv.load_adapter(tiny_vit(depth=3), tmp_path / "a")  # builds a plan from the file and injects it
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), model(images))


def test_a_plan_whose_slices_differ_on_this_model_is_refused():
    config = nv.LoRAConfig(rank=2, targets=["attn.q", "attn.v"])
    plan = nv.plan_injection(tiny_vit(), config)
    nv.inject(tiny_vit(), plan)  # onto the same architecture it injects
    narrower = tiny_vit(depth=1)  # the plan's blocks.1 layers are missing here
    with pytest.raises(ValueError, match="plan"):
        nv.inject(narrower, plan)
    deeper = tiny_vit(depth=4)
    with pytest.raises(ValueError, match=r"select 2 layer\(s\) the plan leaves out \(blocks\.2\.attn\.qkv"):
        nv.inject(deeper, plan)
    assert not nv.adapted_layers(deeper)


@pytest.mark.parametrize("change", ["dropout", "norm"])
def test_dropout_or_a_norm_set_after_inject_before_an_fc2_that_took_the_activation_over_is_refused(images, change):
    model = nv.inject(tiny_vit(), nv.NOLAConfig(**SMALL_NOLA, targets=["mlp.fc2"]))
    assert model.blocks[1].mlp.fc2.input_activation is not None  # recompute_activation took mlp.act over
    if change == "dropout":
        model.blocks[1].mlp.drop1.p = 0.5
        with torch.no_grad():
            model.eval()(images)  # dropout is off in eval mode: the outputs are right
        with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.drop1 now drops.*recompute_activation=False"):
            model.train()(images)
    else:
        model.blocks[1].mlp.norm = nn.LayerNorm(model.blocks[1].mlp.fc1.out_features)
        with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.norm is now a LayerNorm.*recompute_activation=False"):
            with torch.no_grad():
                model.eval()(images)  # a norm changes outputs in every mode


def test_dropout_is_refused_only_where_fc2_took_the_activation_over(images):
    outputs = []
    for recompute in (True, False):
        model = tiny_vit()
        for block in model.blocks:
            block.mlp.drop1.p = 0.5
        nv.inject(model, nv.NOLAConfig(**SMALL_NOLA, targets=["mlp.fc2"], recompute_activation=recompute))
        assert model.blocks[0].mlp.fc2.input_activation is None
        torch.manual_seed(3)
        with torch.no_grad():
            outputs.append(model.train()(images))
    torch.testing.assert_close(outputs[0], outputs[1])
    # set after inject with recompute_activation=False: nothing was taken over, so nothing to refuse
    model = nv.inject(tiny_vit(), nv.NOLAConfig(**SMALL_NOLA, targets=["mlp.fc2"], recompute_activation=False))
    model.blocks[0].mlp.drop1.p = 0.5
    model.train()(images)
    # and the check is only attribute reads: a model whose Mlps are unchanged still trains with recomputation
    model = nv.inject(tiny_vit(), nv.NOLAConfig(**SMALL_NOLA, targets=["mlp.fc2"]))
    model.train()(images).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="drop1 now drops"):
        model.blocks[0].mlp.drop1 = nn.Dropout(0.1)
        model(images)


@pytest.mark.parametrize("config_cls", [nv.NOLAConfig, nv.LoRAConfig])
def test_seeds_beyond_int64_are_refused_at_config_time_naming_the_range(config_cls, images):
    for seed in (2**63, -(2**63) - 1, 2**64):
        with pytest.raises(ValueError, match=r"seed must be an integer in torch's int64 range "
                                             r"\[-9223372036854775808, 9223372036854775807\]"):
            config_cls(rank=2, seed=seed)
    for seed in (2**63 - 1, -(2**63)):  # the ends of the range inject and run
        model = nv.inject(tiny_vit(), config_cls(rank=2, seed=seed))
        model(images)
    config = config_cls(rank=2)
    config.seed = 2**63  # set after construction: refused by inject, which leaves the model as it was
    model = tiny_vit()
    with pytest.raises(ValueError, match="int64 range"):
        nv.inject(model, config)
    assert not nv.adapted_layers(model)
    with pytest.raises(ValueError, match=r"rank must be an integer in torch's int64 range \[1, "):
        config_cls(rank=2**63)


@pytest.mark.parametrize("config", [nv.NOLAConfig(rank=100, num_basis_a=8, num_basis_b=8),
                                    nv.LoRAConfig(rank=100, targets=["mlp.fc1", "mlp.fc2"])])
def test_a_rank_above_a_layers_smaller_size_warns_naming_the_layer_and_the_sizes(config):
    # accepted silently: ΔW = A·B of a 64→256 layer has rank at most 64, whatever the rank trains
    with pytest.warns(UserWarning, match=rf"{type(config).__name__} on blocks\.0\.mlp\.fc1 \(64→256\) and 3 more "
                                         r"layer\(s\): rank=100 is above min\(in, out\)=64: .*use rank <= 64"):
        nv.inject(tiny_vit(), config)
    model = tiny_vit()
    with pytest.warns(UserWarning, match="is above min"):  # planned first, as the concepts guide does
        plan = nv.plan_injection(model, config)
    nv.inject(model, plan)


def test_a_rank_above_a_layers_smaller_size_warns_at_inject_not_at_each_load_of_its_file(tmp_path):
    # the advice is for whoever chooses the rank: it was repeated at every load_adapter, verify_adapter and add_task
    with pytest.warns(UserWarning, match="is above min"):
        directory = nv.save_adapter(nv.inject(tiny_vit(), nv.LoRAConfig(rank=100)), tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nv.load_adapter(tiny_vit(), directory)
        nv.MultiTaskModel(tiny_vit()).add_task("a", directory)


def test_a_rank_within_every_layers_sizes_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nv.inject(tiny_vit(), nv.NOLAConfig(rank=64, num_basis_a=8, num_basis_b=8, targets=["mlp.fc1", "mlp.fc2"]))


@pytest.mark.parametrize("config", [dict(rank=16), dict(rank=4, num_basis_a=8192), dict(rank=32, num_basis_b=512)])
def test_bases_whose_size_costs_well_beyond_loras_step_warn_once_naming_k_times_rank(config):
    # rank 32 took 2.2x LoRA's step time and 2.5x its memory on ViT-B, with no word of it
    with pytest.warns(UserWarning, match=r"num_basis × rank = \d+ × \d+: .*grow with k × rank") as caught:
        nv.inject(tiny_vit(), nv.NOLAConfig(**config))
    assert sum("num_basis × rank" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nv.inject(tiny_vit(), nv.NOLAConfig(rank=8, num_basis_a=1024, num_basis_b=1024))  # 2x the defaults: quiet


def test_bases_so_many_their_coefficients_cannot_be_allocated_are_refused_before_inject_allocates_them():
    # num_basis_a=10**9 got the process killed for memory while inject allocated 4 GB per layer
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"would train 7,999,999,996 adapter values .* more than the 2,147,483,648 "
                                         r"inject allocates: lower NOLAConfig\.num_basis_a=1000000000$"):
        nv.inject(model, nv.NOLAConfig(rank=2, num_basis_a=10**9, num_basis_b=10**9 - 1))
    assert not any(isinstance(m, nv.NOLALinear) for m in model.modules())


def test_the_adapter_size_bound_counts_every_layers_trained_tensors(monkeypatch):
    monkeypatch.setattr(plan, "MAX_ADAPTER_VALUES", 100_000)
    nv.inject(tiny_vit(), nv.LoRAConfig(rank=2, targets=["mlp.fc1", "mlp.fc2"]))
    with pytest.raises(ValueError, match=r"would train 384,000 adapter values .* lower LoRAConfig\.rank=300$"):
        nv.inject(tiny_vit(), nv.LoRAConfig(rank=300, targets=["mlp.fc1", "mlp.fc2"]))  # 300·(64+256) on 4 layers


@pytest.mark.parametrize("config, message", [
    # a 57 GiB shared bank on ViT-B: accepted, then killed for memory (or a MemoryError deep in numpy) at the first pass
    (nv.NOLAConfig(rank=4, num_basis_a=10**6, num_basis_b=10**6),
     r"would generate 1,000,000 random bases of shape \(3072, 4\) for A/3072x4 .*22\.9 GiB of int16 codes.* lower "
     r"NOLAConfig\.num_basis_a=1000000 or NOLAConfig\.num_basis_b=1000000"),
    # NOLA trains k + l values whatever the rank: a huge rank failed in torch's allocator at the first pass
    (nv.NOLAConfig(rank=10**6, num_basis_a=4, num_basis_b=4), r"lower NOLAConfig\.rank=1000000"),
])
def test_random_bases_too_large_to_generate_are_refused_at_plan_time(config, message):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
    with pytest.raises(ValueError, match=message):
        nv.plan_injection(model, config)
    nv.plan_injection(model, nv.NOLAConfig(rank=4, num_basis_a=4096, num_basis_b=4096))  # the paper's largest: fine


def test_a_nola_rank_above_the_layer_warns_of_what_it_costs_nola():
    with pytest.warns(UserWarning, match=r"rank=100 is above min\(in, out\)=64: .* only makes each random basis "
                                         r"larger \(memory and compute; the k \+ l trained values stay as they are\)"):
        nv.inject(tiny_vit(), nv.NOLAConfig(rank=100, num_basis_a=8, num_basis_b=8))


@pytest.mark.parametrize("outer", ["linear", "full"])
@pytest.mark.parametrize("inner", ["nola", "lora"])
def test_a_submodule_injected_inside_a_linear_probe_or_full_fine_tuning_is_refused_by_the_outer_model(outer, inner,
                                                                                                      tmp_path):
    # these outer methods adapt no layer in the block, so the inner inject was taken; save_adapter then wrote the
    # inner layers' tensors under the outer method (a file no model loaded), and unload stripped the inner layers
    # while leaving their state and hooks on the block
    model = nv.inject(tiny_vit(), outer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nv.inject(model.blocks[0], inner)
    refusal = (rf"the model holds adapters its '{outer}' injection did not make \(its submodule blocks.0 was "
               r"injected on its own\): one model carries one injection; "
               r"nv.unload\(model.get_submodule\('blocks.0'\)\)")
    with pytest.raises(ValueError, match=refusal):
        nv.save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    for unload in (nv.unload, nv.merge_and_unload):
        with pytest.raises(ValueError, match=rf"nv.{unload.__name__}: " + refusal):
            unload(model)
    assert nv.adapted_layers(model) and all(name.startswith("blocks.0.") for name in nv.adapted_layers(model))
    nv.unload(model.blocks[0])
    nv.save_adapter(model, tmp_path / "adapter")
    assert nv.load_adapter(tiny_vit(), tmp_path / "adapter") is not None
    nv.unload(model)
    assert not nv.adapted_layers(model)
