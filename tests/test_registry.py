"""The registry: built-in methods and recipes, and a method added in one module (``example_method.py``).

That the example method (like every registered one) injects, trains, saves, loads, merges, unloads, exports and
serves is checked by the method matrix (``test_methods.py``); here only what is particular to it.
"""
from dataclasses import dataclass, field

import pytest
import torch
from example_method import FrozenAConfig, FrozenALinear
from tiny_models import tiny_vit
from torch import nn

import nola_vision as nv
from nola_vision.core.config import adapter_to_hparam, as_config, config_from_dict, resolve_adapter
from nola_vision.core.registry import METHODS, method_of


def test_a_method_registered_by_its_own_module_is_found_by_name_and_counted_exactly(tmp_path):
    assert "frozen_a" in nv.available_methods() and nv.get_method("frozen_a").layer_cls is FrozenALinear
    config = FrozenAConfig(targets=["mlp.fc1", "attn.v"])
    model = nv.inject(tiny_vit(), config)
    assert nv.count_parameters(model)["adapter"] == 2 * (2 * 256 + 2 * 64)  # 2 blocks x B of fc1 (2x256), v (2x64)
    nv.save_adapter(model, tmp_path)
    loaded = nv.load_adapter(tiny_vit(), tmp_path)
    assert isinstance(loaded.blocks[1].attn.qkv, FrozenALinear) and loaded.blocks[1].attn.qkv.slices == ((128, 192),)
    assert resolve_adapter(adapter_to_hparam(config)) == config
    assert resolve_adapter(config.to_dict()) == config


def test_built_in_methods_and_plain_configs_come_from_the_registry():
    assert nv.available_methods()[:4] == ["lora", "nola", "linear", "full"]
    assert nv.get_method("nola").layer_cls is nv.NOLALinear and nv.get_method("linear").layer_cls is None
    assert nv.get_method("full").default_lr == 5e-5 and nv.get_method("nola").default_lr == 3e-2
    assert nv.get_method("nola").default_head_lr == 1e-2 and nv.get_method("lora").default_lr == 5e-3
    assert resolve_adapter("linear") == "linear" and resolve_adapter("linear").describe() == "head only"
    assert repr(resolve_adapter("full")) == "'full'"  # in messages: the dataclass-made repr showed FullFineTuneConfig()
    with pytest.raises(ValueError, match="already registered"):
        nv.register_method("nola", nv.LoRAConfig, nv.LoRALinear)
    with pytest.raises(ValueError, match="FrozenAConfig.method must be 'other'"):
        nv.register_method("other", FrozenAConfig, FrozenALinear)
    assert "other" not in nv.available_methods()


def test_a_method_class_defined_again_in_a_rerun_cell_replaces_its_registration():
    namespace: dict = {}
    cell = ("from dataclasses import dataclass\nimport nola_vision as nv\n"
            "@dataclass\nclass RerunConfig(nv.LoRAConfig):\n    method: str = 'rerun_lora'\n"
            "nv.register_method('rerun_lora', RerunConfig, nv.LoRALinear)\n")
    for _ in range(2):  # the same cell, twice: a new class object with the same module and name
        exec(compile(cell, "<notebook cell>", "exec"), namespace)
    assert nv.get_method("rerun_lora").config_cls is namespace["RerunConfig"]
    with pytest.raises(ValueError, match="already registered by .*RerunConfig: choose another name for LoRAConfig"):
        nv.register_method("rerun_lora", nv.LoRAConfig, nv.LoRALinear)
    del METHODS["rerun_lora"]


def test_a_variant_cannot_take_a_registered_methods_name_and_a_built_in_keeps_its_recipe():
    """Registered under "lora" with LoRAConfig (its method is "lora"), a LoRA variant replaced the built-in for the
    whole process: every LoRA file then loaded into it. Re-registering the built-in without its recipe dropped it."""
    class DoubledLoRA(nv.LoRALinear):
        def factors(self):
            a, b = super().factors()
            return 2 * a, b

    before = nv.get_method("lora")
    with pytest.raises(ValueError, match=r"registered with layer class nola_vision\.methods\.lora\.layer\.LoRALinear"
                                         r".*name of its own: a subclass of LoRAConfig with method = 'my_lora'"):
        nv.register_method("lora", nv.LoRAConfig, DoubledLoRA)
    with pytest.raises(ValueError, match=r"'lora' is built in and keeps its registration \(its recipe: lr 0.005, "
                                         r"head lr 0.003"):
        nv.register_method("lora", nv.LoRAConfig, nv.LoRALinear)
    assert nv.get_method("lora") is before
    again = nv.register_method("lora", nv.LoRAConfig, nv.LoRALinear, default_lr=before.default_lr,
                               default_head_lr=before.default_head_lr)  # the same registration: a no-op
    assert again == before


class _NotDefiningShapes(nv.AdaptedLinear):
    adapter_parameter_names = ("b",)

    def factors(self):
        raise AssertionError("never called")


class _NotDefiningFactors(nv.AdaptedLinear):
    adapter_parameter_names = ("b",)

    @classmethod
    def parameter_shapes(cls, config, in_features, width, num_slices):
        return {"b": (num_slices, config.rank, width)}


@pytest.mark.parametrize("layer_cls, message", [
    (nn.Linear, r"Linear is not a subclass of nola_vision.AdaptedLinear"),
    (_NotDefiningShapes, r"_NotDefiningShapes does not define parameter_shapes, which every"),
    (_NotDefiningFactors, r"_NotDefiningFactors does not define factors, which every"),
])
def test_a_layer_class_that_breaks_the_contract_is_refused_when_registered(layer_cls, message):
    @dataclass
    class BrokenConfig(nv.AdapterConfig):
        rank: int = 2
        targets: list = field(default_factory=lambda: ["mlp.fc1"])
        method = "broken"
        scaling = 1.0

    with pytest.raises(TypeError, match=message):
        nv.register_method("broken", BrokenConfig, layer_cls)
    assert "broken" not in nv.available_methods()


def test_a_config_that_is_not_an_adapter_config_is_refused_by_name_at_inject():
    class LooseConfig:  # says a registered method, but is no AdapterConfig (no targets, no to_dict)
        method = "frozen_a"

    METHODS["loose"] = METHODS["frozen_a"].__class__("loose", LooseConfig, FrozenALinear)
    LooseConfig.method = "loose"
    try:
        with pytest.raises(TypeError, match=r"LooseConfig \(method 'loose'\) is not a subclass of "
                                            r"nola_vision.AdapterConfig"):
            nv.inject(tiny_vit(), LooseConfig())
    finally:
        del METHODS["loose"]


def test_a_layer_holding_state_its_files_do_not_store_is_refused_at_save(tmp_path):
    """A frozen random A kept as a persistent buffer (drawn from torch's global generator, say) is in the state dict
    but not in the file: the file loaded with other outputs, and verify_adapter passed."""
    @dataclass
    class PersistentAConfig(FrozenAConfig):
        method = "persistent_a"

    class PersistentA(FrozenALinear):
        def __init__(self, base, config, name, slices):
            super().__init__(base, config, name, slices)
            self.register_buffer("kept_A", self.fa_A.clone())  # persistent

        def factors(self):
            return self.kept_A, self.trained("fa_B")

    nv.register_method("persistent_a", PersistentAConfig, PersistentA)
    try:
        with pytest.raises(ValueError, match=r"blocks.0.mlp.fc1 \(PersistentA\) holds \['kept_A'\] in its state, "
                                             r"which adapter files do not store.*persistent=False"):
            nv.save_adapter(nv.inject(tiny_vit(), PersistentAConfig()), tmp_path / "a")
        assert not (tmp_path / "a").exists()
    finally:
        del METHODS["persistent_a"]
    nv.save_adapter(nv.inject(tiny_vit(), FrozenAConfig()), tmp_path / "b")  # its non-persistent buffer: saved


def test_a_built_in_method_whose_modules_are_reloaded_registers_again():
    """importlib.reload (or autoreload) of nola_vision.methods.lora gives new classes at the same paths with the same
    recipe: refused as a changed registration of a built-in."""
    before = METHODS["lora"]
    config = type("LoRAConfig", (nv.LoRAConfig,), {"__module__": before.config_cls.__module__,
                                                   "__qualname__": "LoRAConfig"})
    layer = type("LoRALinear", (nv.LoRALinear,), {"__module__": before.layer_cls.__module__,
                                                  "__qualname__": "LoRALinear"})
    try:
        again = nv.register_method("lora", config, layer, default_lr=before.default_lr,
                                   default_head_lr=before.default_head_lr)
        assert again.config_cls is config and again.layer_cls is layer
    finally:
        METHODS["lora"] = before


def test_a_method_is_found_in_any_letter_case_by_get_method_as_by_inject():
    """``inject("LoRA")`` worked while ``get_method("LoRA")`` was refused; a method registered with capitals could not
    be injected by its own name at all (``inject`` looked up the lower-cased name only)."""
    @dataclass
    class CapitalConfig(nv.LoRAConfig):
        method: str = "Capital_LoRA"

    nv.register_method("Capital_LoRA", CapitalConfig, nv.LoRALinear)
    try:
        assert nv.get_method("LoRA") is nv.get_method("lora") and nv.get_method("NOLA").name == "nola"
        assert nv.get_method("capital_lora").config_cls is CapitalConfig
        assert isinstance(resolve_adapter("Capital_LoRA"), CapitalConfig)
        assert isinstance(resolve_adapter("LoRA"), nv.LoRAConfig)
        # every lookup by name alike (as_config and method_of took exact names only, and suggested 'linear' for
        # 'Linear')
        assert as_config("Linear").describe() == "head only" and config_from_dict("FULL").method == "full"
        assert method_of("Linear").name == "linear" and method_of("capital_lora").config_cls is CapitalConfig
        with pytest.raises(ValueError, match=r"unknown adapter method 'lor'; expected one of \['lora'"):
            nv.get_method("lor")
    finally:
        del METHODS["Capital_LoRA"]


def test_a_config_class_path_names_that_class_even_where_another_registered_class_shares_its_name():
    """Two packages' ``Config`` classes: ``pkg_b.Config`` resolved to the first registered (another method), and the
    CLI trained and saved that method under the config path the user gave."""
    import types

    first, second = (types.ModuleType(f"ext_pkg_{letter}") for letter in "ab")
    for module, name in ((first, "ext_first"), (second, "ext_second")):
        exec(compile("from dataclasses import dataclass, field\nfrom typing import List\nimport nola_vision as nv\n"
                     "@dataclass\nclass Config(nv.LoRAConfig):\n    pass\n"
                     f"Config.method = {name!r}\n", module.__name__, "exec"), vars(module))
        nv.register_method(name, module.Config, nv.LoRALinear)
    try:
        for module, name in ((first, "ext_first"), (second, "ext_second")):
            config = resolve_adapter({"class_path": f"{module.__name__}.Config", "init_args": {"rank": 2}})
            assert type(config) is module.Config and config.method == name
            assert type(resolve_adapter(adapter_to_hparam(config))) is module.Config
        with pytest.raises(ValueError, match=r"2 registered configs are named Config \(ext_pkg_a\.Config, "
                                             r"ext_pkg_b\.Config\): give the whole path of one"):
            resolve_adapter({"class_path": "Config", "init_args": {}})
        # a path to a class of a registered one's name is not taken for it (nola_vision's NOLAConfig, here)
        with pytest.raises(ValueError, match=r"'ext_pkg_c\.NOLAConfig' names no registered config class \(its module "
                                             r"cannot be imported"):
            resolve_adapter({"class_path": "ext_pkg_c.NOLAConfig", "init_args": {}})
        assert type(resolve_adapter({"class_path": "nola_vision.methods.NOLAConfig", "init_args": {}})) is \
            nv.NOLAConfig  # a module that re-exports it
        with pytest.raises(ValueError, match=r"use one of \[.*'ext_pkg_a\.Config'.*\]"):  # its own module, not ours
            resolve_adapter({"class_path": "elsewhere.Unknown", "init_args": {}})
    finally:
        del METHODS["ext_first"], METHODS["ext_second"]


def test_a_config_without_a_targets_field_is_refused_when_registered():
    """The base's empty targets adapted no layer: the method trained its head only, saved under its own name."""
    @dataclass
    class NoTargets(nv.AdapterConfig):
        rank: int = 2
        method = "no_targets"
        scaling = 1.0

    with pytest.raises(TypeError, match=r"NoTargets has no targets field, the layers the method adapts"):
        nv.register_method("no_targets", NoTargets, FrozenALinear)
    assert "no_targets" not in nv.available_methods()


@pytest.mark.parametrize("value", [{"a"}, float("nan"), nn.Identity()], ids=["set", "nan", "module"])
def test_a_config_value_no_adapter_file_can_hold_is_refused_at_inject_naming_the_field(value):
    """A set failed at save_adapter (after training) with json's bare TypeError; NaN saved, then never loaded."""
    config = FrozenAConfig()
    config.extra = value  # a field of the method's own type, as its author may declare one

    class WithExtra(FrozenAConfig):
        def to_dict(self):
            return {**super().to_dict(), "extra": self.extra}

    config.__class__ = WithExtra
    with pytest.raises(ValueError, match=r"WithExtra\.extra=.* cannot be stored in an adapter file \(JSON\)"):
        nv.inject(tiny_vit(), config)


def test_a_tuple_field_read_back_as_a_list_is_the_same_setting():
    """Files store JSON, which has no tuples: a task switch onto a model injected with the same config was refused
    as ``pair (1, 2) in the model, [1, 2] in the file``."""
    class WithPair(FrozenAConfig):
        def to_dict(self):
            return {**super().to_dict(), "pair": self.pair}

    config, stored = WithPair(), WithPair()
    config.pair, stored.pair = (1, 2), [1, 2]
    assert config.same_update(stored)
    stored.pair = [1, 3]
    assert not config.same_update(stored)


def test_loading_a_method_nobody_registered_says_to_import_the_module_that_registers_it():
    with pytest.raises(ValueError, match=r"unknown adapter method 'vera_like'; expected one of .* \(a method of your "
                                         r"own is known once the module that registers it.*is imported\)"):
        config_from_dict({"method": "vera_like", "rank": 4})


def test_factors_of_another_layout_are_refused_naming_the_method():
    """A (slices, rank, in), peft's layout, was reshaped by element count into another update without a word."""
    class TransposedA(FrozenALinear):
        def factors(self):
            a, b = super().factors()
            return a.transpose(1, 2), b

    model = nv.inject(tiny_vit(), FrozenAConfig(targets=["mlp.fc1"]))
    layer = model.blocks[0].mlp.fc1
    layer.__class__ = TransposedA
    with pytest.raises(ValueError, match=r"TransposedA\.factors\(\) gave A \(1, 2, 64\) and B \(1, 2, 256\); .*needs "
                                         r"A \(1, 64, 2\) and B \(1, 2, 256\)"):
        layer.delta_factors()


class _Unlisted(FrozenALinear):
    def __init__(self, base, config, name, slices):
        super().__init__(base, config, name, slices)
        self.scale = nn.Parameter(torch.ones(1))  # trained, but not in adapter_parameter_names


class _Reshaped(FrozenALinear):
    def __init__(self, base, config, name, slices):
        super().__init__(base, config, name, slices)
        self.fa_B = nn.Parameter(torch.zeros(self.fa_B.shape[::-1]))


class _Unnamed(FrozenALinear):
    adapter_parameter_names = ("fa_B", "fa_C")

    @classmethod
    def parameter_shapes(cls, config, in_features, width, num_slices):
        return {"fa_B": (num_slices, config.rank, width), "fa_C": (1,)}


@pytest.mark.parametrize("layer_cls, message", [
    (_Unlisted, r"_Unlisted on blocks\.0\.mlp\.fc1 creates parameter\(s\) scale that _Unlisted"
                r"\.adapter_parameter_names does not list"),
    (_Reshaped, r"_Reshaped created fa_B of shape \(256, 2, 1\) on blocks\.0\.mlp\.fc1, where _Reshaped"
                r"\.parameter_shapes gives \(1, 2, 256\)"),
    (_Unnamed, r"_Unnamed\.adapter_parameter_names lists fa_C, which the layer on blocks\.0\.mlp\.fc1 does not "
               r"create"),
], ids=["unlisted", "reshaped", "never created"])
def test_a_layer_whose_parameters_are_not_those_its_class_declares_is_refused_at_inject(layer_cls, message):
    """An unlisted parameter trained uncounted and unsaved (save_adapter then advised the 'full' method), a shape of
    its own was blamed at save on a change after inject, and a listed one never created failed with AttributeError."""
    @dataclass
    class ContractConfig(FrozenAConfig):
        method = "contract"

    ContractConfig.method = "contract"
    nv.register_method("contract", ContractConfig, layer_cls)
    try:
        model = tiny_vit()
        with pytest.raises(TypeError, match=message):
            nv.inject(model, ContractConfig(targets=["mlp.fc1"]))
        assert not nv.adapted_layers(model)
    finally:
        del METHODS["contract"]


@pytest.mark.parametrize("class_path, method", [("nola_vision.methods.LinearProbeConfig", "linear"),
                                                ("FullFineTuneConfig", "full"),
                                                ("nola_vision.methods.plain.FullFineTuneConfig", "full")])
def test_the_plain_methods_config_classes_are_taken_as_the_cli_lists_them(class_path, method):
    """`fit --help` lists them as model.adapter's subclasses, and each was refused as 'not registered'."""
    assert resolve_adapter({"class_path": class_path}).method == method
    with pytest.raises(ValueError, match=r"unknown .*Config fields \['rank'\]; valid fields are \[\]"):
        resolve_adapter({"class_path": class_path, "init_args": {"rank": 2}})
