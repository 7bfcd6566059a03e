"""Arguments are checked at the boundary: a config field, API argument or option of the wrong type or range is refused
at construction with its name, before it reaches deep code (a NaN scale, a string seed, a float batch size)."""
import json
import math

import numpy as np
import pytest
import torch
from fixtures_data import write_imagefolder
from tiny_models import as_if_trained, tiny_vit

import nola_vision as nv
from nola_vision.core.config import config_from_dict, resolve_adapter
from nola_vision.core.inject import adapter_state
from nola_vision.data import FewShotDataModule, build_dataset
from nola_vision.data.datamodule import FewShotSubset
from nola_vision.train.module import FewShotClassifier

TINY = dict(backbone="vit_tiny_patch16_224", pretrained=False, image_size=32,
            backbone_kwargs=dict(patch_size=8, depth=2, embed_dim=64, num_heads=2))


@pytest.mark.parametrize("cls, field, value", [
    (nv.NOLAConfig, "scale", math.nan),
    (nv.NOLAConfig, "scale", math.inf),
    (nv.NOLAConfig, "scale", "abc"),
    (nv.NOLAConfig, "scale", 10**400),
    (nv.LoRAConfig, "alpha", math.inf),
    (nv.LoRAConfig, "alpha", "8"),
    (nv.NOLAConfig, "seed", "abc"),
    (nv.NOLAConfig, "seed", 1.5),
    (nv.LoRAConfig, "seed", True),
    (nv.NOLAConfig, "rank", 2.0),
    (nv.LoRAConfig, "rank", "4"),
    (nv.NOLAConfig, "num_basis_a", 0),
    (nv.NOLAConfig, "recompute_activation", "no"),
    (nv.NOLAConfig, "basis", ["shared"]),
])
def test_a_config_field_of_the_wrong_type_or_range_is_refused_naming_it(cls, field, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field} must be"):
        cls(**{field: value})


@pytest.mark.parametrize("value", [torch.tensor(True), torch.tensor([True]), torch.tensor([2]), torch.tensor([[2]]),
                                   np.array(True), np.array([2])])
def test_a_bool_tensor_or_an_array_with_dimensions_is_not_an_integer(value):
    # torch's __index__ took tensor(True) as rank 1 and tensor([[2]]) as rank 2 (numpy refuses both)
    with pytest.raises(ValueError, match=r"NOLAConfig\.rank must be"):
        nv.NOLAConfig(rank=value)
    with pytest.raises(ValueError, match=r"LoRAConfig\.rank must be"):
        nv.LoRAConfig(rank=value)
    with pytest.raises(ValueError, match=r"FewShotDataModule\.shots "):
        FewShotDataModule(dataset="digits", shots=value)


def test_an_int64_range_refusal_names_the_lower_bound_asked_for():
    from nola_vision.core.checks import check_int

    with pytest.raises(ValueError, match=r"x must be an integer in torch's int64 range \[0, 9223372036854775807\]"):
        check_int(2**64, "x", at_least=0, int64=True)  # said [-9223372036854775808, ...]


def test_a_0d_integer_tensor_or_array_is_an_integer_like_a_numpy_integer():
    config = nv.NOLAConfig(rank=torch.tensor(2), seed=np.array(3))
    assert (config.rank, config.seed) == (2, 3) and (type(config.rank), type(config.seed)) == (int, int)


@pytest.mark.parametrize("targets", [None, 5, ["mlp.fc1", 1], {"mlp.fc1": 1}, []])
def test_targets_must_be_a_name_or_a_list_of_names(targets):
    with pytest.raises(ValueError, match="targets must"):
        nv.NOLAConfig(targets=targets)


def test_a_single_target_string_and_numpy_numbers_are_accepted_as_plain_values():
    config = nv.NOLAConfig(targets="mlp.fc1", rank=np.int64(2), seed=np.int32(3), scale=np.float32(2.0))
    assert config.targets == ["mlp.fc1"]
    assert (type(config.rank), type(config.seed), type(config.scale)) == (int, int, float)
    assert json.loads(json.dumps(config.to_dict()))["rank"] == 2  # stored forms stay plain JSON
    assert nv.LoRAConfig(alpha=None).scaling == 1.0 and nv.LoRAConfig(rank=4, alpha=8).scaling == 2.0


def test_a_repeated_target_is_kept_once_so_equal_injections_have_equal_configs():
    repeated = nv.LoRAConfig(targets=["attn.v", "attn.q", "attn.v"])
    assert repeated.targets == ["attn.v", "attn.q"] and repeated == nv.LoRAConfig(targets=["attn.v", "attn.q"])
    assert nv.NOLAConfig(targets=("mlp.fc1", "mlp.fc1")).targets == ["mlp.fc1"]


def test_inject_and_plan_injection_take_a_configs_dict_forms_as_create_model_does():
    config = nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8, seed=3)  # inject refused these ("got dict")
    fields = {key: value for key, value in config.to_dict().items() if key != "method"}
    for form in (config.to_dict(), {"class_path": "nola_vision.NOLAConfig", "init_args": fields}):
        assert nv.plan_injection(tiny_vit(), form).config == config
        assert adapter_state(nv.inject(tiny_vit(), form)).config_dict() == config.to_dict()
    with pytest.raises(ValueError, match=r"unknown NOLAConfig fields \['rnk'\]"):
        nv.inject(tiny_vit(), {"method": "nola", "rnk": 2})


def test_numpy_bools_are_kept_as_bools_so_what_they_reach_saves(tmp_path):
    # a numpy bool was checked and kept: the model's every save failed at json.dumps, a fit's adapter export too
    config = nv.LoRAConfig(rank=2, recompute_activation=np.True_)
    assert type(config.recompute_activation) is bool
    model = nv.inject(tiny_vit(), config)
    nv.save_adapter(as_if_trained(model), tmp_path / "adapter")
    assert nv.verify_adapter(tiny_vit(), tmp_path / "adapter").plan.config.recompute_activation is True
    data = FewShotDataModule(dataset="digits", root=str(tmp_path), allow_fewer=np.True_, pin_memory=np.False_,
                             download=np.False_, cache_images=np.True_)
    assert all(type(data.hparams[k]) is bool for k in ("allow_fewer", "pin_memory", "download", "cache_images"))
    assert data.allow_fewer is True  # and the draw takes it (sample_kshot refused numpy's)
    nola = nv.inject(tiny_vit(), nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8))
    nv.set_basis_holding(nola, np.True_)  # was refused, unlike every other flag
    with pytest.raises(ValueError, match="set_basis_holding: hold must be true, false or None, got 'no'"):
        nv.set_basis_holding(nola, "no")


def test_a_transform_that_is_not_callable_is_refused_before_the_first_image(tmp_path):
    write_imagefolder(tmp_path, ("a", "b"), 2, 1, eval_folder="test")
    with pytest.raises(TypeError, match=r"build_dataset: transform must be a callable .*got 5 \(int\)"):
        build_dataset("imagefolder", tmp_path, transform=5)
    with pytest.raises(TypeError, match=r"FewShotSubset transform must be a callable .*got 'abc' \(str\)"):
        FewShotSubset(build_dataset("imagefolder", tmp_path), [0], transform="abc")


def deeply_nested(depth: int = 10_000) -> dict:
    root = node = {}
    for _ in range(depth):
        node["a"] = {}
        node = node["a"]
    return root


@pytest.mark.parametrize("build", [
    lambda deep: resolve_adapter({"method": "nola", "targets": deep}),
    lambda deep: resolve_adapter({"class_path": "nola_vision.NOLAConfig", "init_args": {"scale": deep}}),
    lambda deep: resolve_adapter({"class_path": deep}),
    lambda deep: resolve_adapter({"rank": deep}),
    lambda deep: config_from_dict({"method": deep}),
    lambda deep: config_from_dict(deep),
])
def test_a_deeply_nested_config_gives_a_short_clear_error_not_a_recursion_error(build):
    with pytest.raises(ValueError) as error:
        build(deeply_nested())
    assert len(str(error.value)) < 400


def test_a_flat_config_is_the_built_in_method_that_takes_its_keys_not_a_later_plugin_nor_a_guess():
    # conftest registers frozen_a {rank, targets, seed}: fewer fields than LoRA, but a flat LoRA config is still LoRA
    assert type(resolve_adapter({"rank": 4, "alpha": 8})) is nv.LoRAConfig
    assert type(resolve_adapter({"rank": 4, "num_basis_a": 8})) is nv.NOLAConfig
    with pytest.raises(ValueError, match="LoRAConfig.rank must be"):
        resolve_adapter({"rank": "4", "alpha": 8})
    # keys both built-in configs take named no method, and built LoRA without a word (in a NOLA library)
    for keys in ({"rank": 4}, {"rank": 8, "seed": 1, "targets": ["mlp.fc1"]}):
        with pytest.raises(ValueError, match=r"fits LoRAConfig and NOLAConfig alike: add method: <name> \(one of "
                                             r"\['lora', 'nola'\]\)"):
            resolve_adapter(keys)
        assert type(resolve_adapter({**keys, "method": "nola"})) is nv.NOLAConfig


def test_config_dicts_with_unknown_fields_or_no_method_name_the_problem():
    with pytest.raises(ValueError, match="needs a 'method' key"):
        config_from_dict({"rank": 2})
    with pytest.raises(ValueError, match=r"unknown LoRAConfig fields \['ranks'\]"):
        resolve_adapter({"class_path": "nola_vision.LoRAConfig", "init_args": {"ranks": 2}})
    with pytest.raises(ValueError, match="init_args must be a mapping"):
        resolve_adapter({"class_path": "nola_vision.LoRAConfig", "init_args": [2]})


@pytest.mark.parametrize("field, value", [
    ("num_classes", 0), ("num_classes", 2.0), ("lr", math.nan), ("lr", "abc"), ("lr", 0.0), ("head_lr", -1e-3),
    ("head_lr", math.inf), ("lr", 1e38), ("head_lr", 1e6), ("min_lr", -1.0), ("weight_decay", math.nan),
    ("momentum", "0.9"),
    ("warmup_epochs", -1), ("warmup_epochs", 1.5), ("label_smoothing", 1.0), ("label_smoothing", -0.1),
    ("quant_bits", 16), ("quant_bits", 8.0), ("adapter_bits", 12), ("adapter_bits", np.float64(16)),
    ("optimizer", "lamb"), ("pretrained", "yes"), ("image_size", 0), ("backbone_seed", "0"),
    ("backbone_kwargs", ["depth", 2]), ("adapter_dir", 3), ("backbone", None),
])
def test_classifier_arguments_of_the_wrong_type_or_range_are_refused_naming_them(field, value):
    with pytest.raises(ValueError, match=rf"FewShotClassifier\.{field} "):
        FewShotClassifier(**{"num_classes": 4, "adapter": "linear", **TINY, field: value})


def test_min_lr_above_the_resolved_lr_is_refused():
    with pytest.raises(ValueError, match="min_lr .* must not exceed lr"):
        FewShotClassifier(num_classes=4, adapter="linear", lr=1e-4, min_lr=1e-3, **TINY)


def test_checked_classifier_arguments_are_stored_as_plain_values():
    model = FewShotClassifier(num_classes=np.int64(4), adapter="linear", adapter_bits=np.int64(8), **TINY)
    assert type(model.hparams.num_classes) is int and model.hparams.adapter_bits == 8
    assert model.hparams.backbone_kwargs == TINY["backbone_kwargs"]


@pytest.mark.parametrize("field, value", [
    ("shots", -1), ("shots", 5.0), ("val_shots", -1), ("batch_size", 0), ("batch_size", 16.0),
    ("eval_batch_size", 0), ("num_workers", -1), ("image_size", 0), ("split_seed", "7"), ("split_seed", 1.5),
    ("shuffle_seed", "x"), ("cache_mb", -1), ("cache_mb", math.nan), ("cache_images", "false"),
    ("augment", "randaugment"), ("normalize", "cifar"), ("root", None), ("split_file", 3), ("dataset", 10),
])
def test_datamodule_arguments_of_the_wrong_type_or_range_are_refused_naming_them(field, value):
    with pytest.raises(ValueError, match=rf"FewShotDataModule\.{field} "):
        FewShotDataModule(**{"dataset": "digits", field: value})


def test_a_validation_manifest_without_a_train_manifest_is_refused(tmp_path):
    with pytest.raises(ValueError, match="val_split_file is read only with a split_file"):
        FewShotDataModule("digits", val_split_file=str(tmp_path / "val.txt"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    directory = tmp_path_factory.mktemp("task") / "probe"
    nv.save_adapter(as_if_trained(nv.inject(tiny_vit(), "linear"), seed=0, scale=0.2), directory)
    model = nv.MultiTaskModel(tiny_vit())
    model.add_task("probe", directory)
    return model


@pytest.mark.parametrize("cache_mb", ["abc", -1.0, math.nan, math.inf, True])
def test_multitask_cache_budget_must_be_a_finite_size(cache_mb):
    with pytest.raises(ValueError, match="cache_mb must be a finite number"):
        nv.MultiTaskModel(tiny_vit(), cache_mb=cache_mb)


@pytest.mark.parametrize("tasks", [3, ["probe", 3, "probe", "probe"], None, {"probe": 1}])
def test_multitask_tasks_must_be_one_name_or_a_list_of_names(served, images, tasks):
    with pytest.raises(ValueError, match="tasks must be one task name"):
        served(images, tasks)


def test_multitask_takes_a_tuple_of_names(served, images):
    assert len(served(images, ("probe",) * 4)) == 4 and torch.isfinite(served(images, "probe")[0]).all()
