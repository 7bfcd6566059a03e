"""Bad values given to public functions that took them silently, read them as something else, or failed deep inside
another library: each is refused naming the argument."""
import json
import os
import re
import warnings
from dataclasses import dataclass

import pytest
import timm
import torch
from tiny_models import as_if_trained, tiny_vit

import nola_vision as nv
import nola_vision.data as nvdata
from nola_vision.adapters import read_adapter
from nola_vision.core.registry import register_method


def test_read_adapters_legacy_flag_is_a_bool(tmp_path):
    # "no" was true: a format-1 file without checksums loaded unchecked
    nv.save_adapter(nv.inject(tiny_vit(), "lora"), tmp_path)
    with pytest.raises(ValueError, match=r"allow_unchecked_legacy must be true or false, got 'no'"):
        read_adapter(tmp_path, allow_unchecked_legacy="no")


def test_create_model_takes_pretrained_as_a_bool_and_names_an_argument_the_model_lacks():
    with pytest.raises(ValueError, match=r"pretrained must be true or false, got 'no'"):  # "no" downloaded weights
        nv.create_model("vit_tiny_patch16_224", pretrained="no")
    with pytest.raises(TypeError, match=r"takes no argument 'nola_rank': nola_\* arguments belong to the \*_nola "
                                        r"names \(vit_tiny_patch16_224_nola\)"):
        nv.create_model("vit_tiny_patch16_224", adapter="lora", nola_rank=2)  # was timm's bare TypeError
    with pytest.raises(TypeError, match=r"takes no argument 'rank': a \*_nola name takes NOLA settings with a nola_ "
                                        r"prefix: pass nola_rank="):  # "check its spelling" did not say how
        nv.create_model("vit_tiny_patch16_224_nola", pretrained=False, rank=2)


def test_an_empty_adapter_config_names_no_method():
    with pytest.raises(ValueError, match="an empty adapter config names no method"):  # built LoRA's defaults
        nv.create_model("vit_tiny_patch16_224", adapter={})


@pytest.mark.parametrize("config", [lambda: nv.LoRAConfig(alpha=1e300), lambda: nv.NOLAConfig(scale=-1e300)])
def test_a_scale_beyond_float32_is_refused(config):
    with pytest.raises(ValueError, match="beyond float32's largest number"):  # every output was inf/NaN
        config()


@pytest.mark.parametrize("rates, message", [
    (dict(default_lr=float("nan")), "default_lr must be a finite number > 0"),
    (dict(default_lr=True), "default_lr must be a finite number > 0"),
    (dict(default_head_lr="0.1"), "default_head_lr must be a finite number > 0"),
])
def test_register_method_checks_its_recipes_rates(rates, message):
    @dataclass
    class Probe(nv.AdapterConfig):  # trained at lr=nan, or failed with a bare TypeError inside FewShotClassifier
        method = "probe_rates"

    with pytest.raises(ValueError, match=message):
        register_method("probe_rates", Probe, **rates)


def test_read_manifest_takes_a_path_not_a_file_descriptor(tmp_path):
    # an int was opened as a file descriptor and closed, the caller's file with it
    with open(tmp_path / "other.txt", "w") as other:
        with pytest.raises(ValueError, match="the manifest must be a path, got"):
            nvdata.read_manifest(other.fileno())
        other.write("still open")


def test_dataset_roots_are_checked_before_reading_or_downloading(tmp_path):
    (tmp_path / "afile").write_text("")
    for root in (tmp_path / "afile", tmp_path / "afile" / "sub"):  # os.makedirs' bare FileExistsError
        with pytest.raises(ValueError, match=r"cannot download cifar10 into .*afile is a file, not a folder"):
            nvdata.download_dataset("cifar10", root=root)
    with pytest.raises(ValueError, match="the dataset root must be a path, got None"):  # os.fspath's TypeError
        nvdata.build_dataset("cifar10", root=None)


def test_a_loader_worker_count_the_machine_cannot_start_is_refused(tmp_path):
    # a million workers hung the first train loader
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with pytest.raises(ValueError, match=rf"num_workers=1000000 would start that many loader processes on {cpus} CPUs"):
        nvdata.FewShotDataModule(dataset="digits", root=str(tmp_path), num_workers=10**6)


@pytest.mark.parametrize("slices", [[(0, 7)], [(-1, 3)], [(0, 4), (2, 6)], [(3, 0)]])
def test_a_layer_built_on_slices_outside_or_across_its_outputs_is_refused(slices):
    # (0, 7) of 6 outputs made a 7-row factor whose last row the forward pass dropped
    with pytest.raises(ValueError, match=r"must be disjoint ranges of the layer's 6 outputs"):
        nv.LoRALinear(torch.nn.Linear(8, 6), nv.LoRAConfig(rank=2), "x", slices=slices)
    json.dumps(slices)  # plain values: the message shows them as given


@pytest.mark.parametrize("layer, config", [(nv.LoRALinear, nv.NOLAConfig(rank=2)), (nv.NOLALinear, nv.LoRAConfig())])
def test_a_layer_is_built_from_its_own_methods_config(layer, config):
    # a NOLAConfig built a LoRA layer of its rank; a LoRAConfig, an AttributeError on num_basis_a
    with pytest.raises(TypeError, match=rf"{layer.__name__} is built from a {layer.__name__[:-6]}Config, got a "):
        layer(torch.nn.Linear(8, 6), config, "x")


@pytest.mark.parametrize("kwargs, message", [
    (dict(indices=[-1]), r"FewShotSubset index must be an integer >= 0"),  # served the last image
    (dict(indices=[10**9]), r"must select the dataset's \d+ images"),
    (dict(indices=[True]), r"FewShotSubset index must be an integer"),  # a PIL error deep inside
    (dict(indices=[0], cache="yes"), r"FewShotSubset cache must be true or false"),
    (dict(indices=[0], cache=True, cache_mb=float("nan")), r"FewShotSubset cache_mb must be a finite number"),
])
def test_a_few_shot_subset_checks_its_arguments(tmp_path, kwargs, message):
    dataset = nvdata.build_dataset("digits", root=str(tmp_path))
    with pytest.raises(ValueError, match=message):
        nvdata.FewShotSubset(dataset, **kwargs)


def test_create_models_checks_let_timms_own_forms_and_errors_through():
    import numpy as np

    for pretrained in (None, np.False_):  # timm takes them as false
        nv.create_model("vit_tiny_patch16_224", pretrained=pretrained, img_size=32, depth=1, embed_dim=32,
                        num_heads=2)

    class Block(torch.nn.Module):  # a TypeError inside the build is the block's, not an argument the caller gave
        def __init__(self, dim, num_heads, **kwargs):
            super().__init__()
            (lambda: None)(foo_bar=1)

    with pytest.raises(TypeError, match=r"<lambda>\(\) got an unexpected keyword argument 'foo_bar'"):
        nv.create_model("vit_tiny_patch16_224", block_fn=Block, img_size=32, depth=1, embed_dim=32, num_heads=2)


def test_a_finders_temporary_checkpoint_is_no_resume():
    from types import SimpleNamespace

    from nola_vision.train.module import _resumes

    assert not _resumes(SimpleNamespace(ckpt_path=None))
    assert not _resumes(SimpleNamespace(ckpt_path="/run/.lr_find_0a1b.ckpt"))  # LearningRateFinder's own
    assert not _resumes(SimpleNamespace(ckpt_path="/run/.scale_batch_size_0a1b.ckpt"))
    assert _resumes(SimpleNamespace(ckpt_path="/run/checkpoints/last.ckpt"))


def test_manifest_helpers_name_a_bad_argument(tmp_path):
    samples = [("a.png", 0), ("b.png", 1)]  # each was a bare pathlib, 'splitlines' or unpacking error
    with pytest.raises(ValueError, match="the manifest must be a path, got None"):
        nvdata.write_manifest(None, samples, [0])
    with pytest.raises(TypeError, match="header is a str of comment lines or None, got 5"):
        nvdata.write_manifest(tmp_path / "m.txt", samples, [0], header=5)
    with pytest.raises(TypeError, match="indices are the chosen samples' positions, got None"):
        nvdata.write_manifest(tmp_path / "m.txt", samples, None)
    for entries in (None, "abc"):
        with pytest.raises(TypeError, match=r"entries are \(key, label\) pairs"):
            nvdata.indices_from_manifest(samples, entries)
    assert nvdata.indices_from_manifest(samples, [("b.png", 1)]) == [1]


@pytest.mark.parametrize("base", [torch.nn.Conv2d(3, 3, 1), None])
def test_an_adapter_layer_built_on_something_else_than_a_linear_names_it(base):
    with pytest.raises(TypeError, match=rf"LoRALinear adapts an nn.Linear, got {type(base).__name__}"):
        nv.LoRALinear(base, nv.LoRAConfig(rank=2), "x")  # a bare AttributeError: out_features


def test_slices_and_manifest_entries_take_arrays_as_before():
    import numpy as np

    layer = nv.LoRALinear(torch.nn.Linear(4, 8), nv.LoRAConfig(rank=2), "x", slices=np.array([[0, 4], [4, 8]]))
    assert layer.slices == ((0, 4), (4, 8))
    samples = [("a.png", 0), ("b.png", 1)]
    assert nvdata.indices_from_manifest(samples, np.array([["a.png", 0]], dtype=object)) == [0]


def test_a_class_count_no_head_could_hold_is_refused_naming_num_classes():
    # 2**40 classes failed in torch's allocator ("you tried to allocate 281474976710656 bytes")
    small = dict(img_size=32, depth=1, embed_dim=64, num_heads=2)
    with pytest.raises(ValueError, match=r"num_classes must be at most 16,777,216 classes"):
        nv.create_model("vit_tiny_patch16_224", num_classes=2**40, pretrained=False, **small)
    from nola_vision.models.backbones import build_backbone
    with pytest.raises(ValueError, match=r"num_classes must be at most 16,777,216 classes"):
        build_backbone("vit_tiny_patch16_224", 2**40, pretrained=False, **small)


def test_a_path_starting_with_a_tilde_names_the_home_folder_in_every_entry_point(tmp_path, monkeypatch):
    # nv.save_adapter("~/x") wrote ./~/x, while FewShotClassifier(adapter_dir="~/x") and the CLI wrote $HOME/x
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model = as_if_trained(nv.inject(tiny_vit(), nv.LoRAConfig(rank=2)))
    nv.save_adapter(model, "~/task")
    nv.export_peft(model, "~/peft")
    assert sorted(os.listdir(tmp_path / "home")) == [".peft.lock", ".task.lock", "peft", "task"]
    assert not (tmp_path / "~").exists()
    loaded = nv.load_adapter(tiny_vit(), "~/task")
    assert nv.adapter_size_bytes("~/task") == nv.adapter_size_bytes(tmp_path / "home" / "task")
    served = nv.MultiTaskModel(tiny_vit())
    served.add_task("task", "~/task")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(served(images, "task")), loaded.eval()(images), rtol=0, atol=1e-5)
    pytest.importorskip("onnx")
    nv.export_onnx(loaded, "~/task.onnx")
    assert (tmp_path / "home" / "task.onnx").is_file() and not (tmp_path / "~").exists()


TINY_BACKBONE = dict(backbone="vit_tiny_patch16_224", num_classes=4, pretrained=False, image_size=32,
                     backbone_kwargs=dict(patch_size=8, depth=2, embed_dim=64, num_heads=2))


def test_an_image_size_beyond_any_models_input_is_refused_before_memory_runs_out():
    # 100,000 px: FewShotDataModule set up, then its first batch asked for terabytes and the process was killed
    with pytest.raises(ValueError, match=r"FewShotDataModule.image_size must be at most 4,096 pixels.*got 100000"):
        nv.FewShotDataModule(dataset="digits", image_size=100_000)
    with pytest.raises(ValueError, match=r"FewShotClassifier.image_size must be at most 4,096"):  # an allocator error
        nv.FewShotClassifier(**{**TINY_BACKBONE, "image_size": 2**20})
    from nola_vision.models import build_backbone

    with pytest.raises(ValueError, match=r"image_size must be at most 4,096"):
        build_backbone("vit_tiny_patch16_224", 4, pretrained=False, image_size=8192)
    # just above the limit the size it quoted was rounded to "holds 0 GiB"
    with pytest.raises(ValueError, match=r"one 3-channel float image of 5,000 px holds 286 MiB, a batch of 32"):
        nv.FewShotDataModule(dataset="digits", image_size=5000)


@pytest.mark.parametrize("rate, value", [("drop_rate", 2.0), ("attn_drop_rate", float("nan")),
                                         ("proj_drop_rate", float("nan")), ("drop_path_rate", 5.0),
                                         ("drop_rate", "0.1")])
def test_regularisation_rates_outside_0_to_1_are_refused_when_the_backbone_is_built(rate, value):
    # torch's "dropout probability has to be between 0 and 1" at construction, or at the first training step for NaN
    kwargs = {**TINY_BACKBONE["backbone_kwargs"], rate: value}
    with pytest.raises(ValueError, match=rf"backbone_kwargs {rate} must be a finite number >= 0 and < 1"):
        nv.FewShotClassifier(**{**TINY_BACKBONE, "backbone_kwargs": kwargs})


def test_a_classifier_of_one_class_is_refused_by_name():
    with pytest.raises(ValueError, match=r"FewShotClassifier.num_classes must be an integer >= 2, got 1"):
        nv.FewShotClassifier(**{**TINY_BACKBONE, "num_classes": 1})  # torchmetrics' error, after the model was built


def test_register_method_refuses_a_config_class_inject_and_save_could_not_use():
    @dataclass
    class NotAnAdapterConfig:  # inject failed on a missing train_backbone
        method = "probe_not_a_config"

    class NotADataclass(nv.AdapterConfig):  # saving failed in dataclasses.asdict
        method = "probe_not_a_dataclass"

    with pytest.raises(TypeError, match=r"NotAnAdapterConfig is not a subclass of nola_vision.AdapterConfig"):
        register_method("probe_not_a_config", NotAnAdapterConfig)
    with pytest.raises(TypeError, match=r"NotADataclass is not a dataclass"):
        register_method("probe_not_a_dataclass", NotADataclass)
    assert not {"probe_not_a_config", "probe_not_a_dataclass"} & set(nv.available_methods())


@pytest.mark.parametrize("fraction", ["0.1", None, False, float("nan")])
def test_register_method_checks_its_warm_up_fraction(fraction):
    @dataclass
    class Probe(nv.AdapterConfig):
        method = "probe_warmup"

    with pytest.raises(ValueError, match=r"default_warmup_fraction must be a finite number >= 0 and < 1"):
        register_method("probe_warmup", Probe, default_warmup_fraction=fraction)  # "0.1": a bare TypeError


def test_a_method_name_differing_from_a_registered_one_only_in_letter_case_is_refused():
    @dataclass
    class Shouting(nv.NOLAConfig):
        method = "NOLA"

    with pytest.raises(ValueError, match=r"'NOLA' differs from the registered 'nola' only in letter case"):
        register_method("NOLA", Shouting, nv.NOLALinear)
    assert nv.get_method("Nola").name == "nola"  # found nothing once "NOLA" was registered beside "nola"


@pytest.mark.parametrize("targets", [["mlp.fc1", "fc1"], ["blocks.0.mlp.fc1", "mlp.fc1"],
                                     ["attn.qkv", "blocks.1.attn.qkv"], ["attn.v", "blocks.0.attn.v"]])
def test_two_targets_selecting_the_same_layer_warn_naming_both_and_it_is_adapted_once(targets, tmp_path):
    """The config records the same adapter spelled two ways, without a word: a task switch onto a model injected with
    one spelling, or a task-input ONNX graph of it, refused the file as another config. Files written so load as
    they did (onto a fresh model, without the warning)."""
    for config in (nv.LoRAConfig(targets=targets), nv.NOLAConfig(targets=targets, num_basis_a=8, num_basis_b=8)):
        with pytest.warns(UserWarning, match=rf"targets {targets[0]!r} and {targets[1]!r} both select blocks\.\d"):
            model = nv.inject(tiny_vit(), config)
        each = [nv.inject(tiny_vit(), type(config)(**{**vars(config), "targets": [target]})) for target in targets]
        assert {name: layer.slices for name, layer in nv.adapted_layers(model).items()} == \
               {name: layer.slices for one in each for name, layer in nv.adapted_layers(one).items()}
        saved = nv.save_adapter(as_if_trained(model, 0, scale=0.1), tmp_path / config.method, bits=32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded = nv.load_adapter(tiny_vit(), saved)
        images = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(images), model.eval()(images))


def test_a_suffix_target_that_also_adapts_a_layer_nested_in_a_block_warns_with_the_regex_of_the_blocks_own(tmp_path):
    # vit_relpos: the default mlp.fc1/mlp.fc2 adapted each block's attn.rel_pos.mlp too (twice the layers), unsaid
    def relpos():
        torch.manual_seed(0)  # the same frozen weights each time
        return timm.create_model("vit_relpos_small_patch16_224", pretrained=False, num_classes=3, img_size=32,
                                 depth=2, embed_dim=64, num_heads=2)

    config = nv.NOLAConfig(num_basis_a=8, num_basis_b=8, rank=2)
    with pytest.warns(UserWarning) as caught:
        model = nv.inject(relpos(), config)
    messages = [str(w.message) for w in caught if "inside modules" in str(w.message)]
    assert len(messages) == 2 and messages[0].startswith(
        "target 'mlp.fc1' also selects 2 layer(s) inside modules whose own mlp.fc1 it adapts "
        "(blocks.0.attn.rel_pos.mlp.fc1, ...")
    regexes = [re.search(r'target the regex r"(.+)" instead', message).group(1) for message in messages]
    assert regexes == [r"blocks\.\d+\.mlp\.fc1", r"blocks\.\d+\.mlp\.fc2"]
    saved = nv.save_adapter(model, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what was chosen is not warned of again at each load
        nv.load_adapter(relpos(), saved)
        outer = nv.inject(relpos(), nv.NOLAConfig(num_basis_a=8, num_basis_b=8, rank=2, targets=regexes))
        nv.inject(tiny_vit(), config)  # a plain ViT: one mlp.fc1 per block
    assert sorted(nv.adapted_layers(outer)) == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1",
                                                "blocks.1.mlp.fc2"]


def test_a_target_on_torchs_multihead_attention_output_projection_is_refused_at_inject():
    class WithTorchAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0].mean(1))

    with pytest.raises(ValueError, match=r"selects attn.out_proj, the output projection of torch's "
                                         r"nn.MultiheadAttention attn, which reads its weight directly"):
        nv.inject(WithTorchAttention(), nv.LoRAConfig(targets=["out_proj"]))  # found at the first forward pass


def test_save_adapter_refuses_class_names_that_are_no_sequence_by_name(tmp_path):
    with pytest.raises(TypeError, match=r"class_names must be a sequence of non-empty strings.*got 5"):
        nv.save_adapter(nv.inject(tiny_vit(), "lora"), tmp_path / "a", class_names=5)  # list(5)'s bare TypeError
    assert not (tmp_path / "a").exists()
