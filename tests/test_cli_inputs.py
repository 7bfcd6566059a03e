"""Bad command-line input to `nola-vision fit`: broken or deeply nested config files and values, options of the wrong
type; each fails before training with a message that names the file or option."""
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest

from nola_vision.cli import main
from nola_vision.train.cli import check_config_sources

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_offline.yaml"
CLI = [sys.executable, "-m", "nola_vision.cli"]
DEEP = '{"a": ' * 10_000 + "1" + "}" * 10_000


def fit(tmp_path, *args):
    return main(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path),
                 "--trainer.enable_progress_bar", "false", *args])


def test_a_yaml_error_in_one_of_several_config_files_names_that_file_and_line(tmp_path, capsys):
    good, broken = tmp_path / "good.yaml", tmp_path / "broken.yaml"
    good.write_text("trainer:\n  max_epochs: 1\n")
    broken.write_text("model:\n  lr: [1, 2\n  min_lr: 0\n")
    assert fit(tmp_path, "-c", str(good), f"--config={broken}") == 2
    err = capsys.readouterr().err
    assert f"config file {broken} is not valid YAML" in err and f'in "{broken}", line 2' in err
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("text, key, lines", [
    ("model:\n  lr: 0.1\ndata:\n  shots: 3\nmodel:\n  min_lr: 0\n", "model", "1 and 5"),
    ("model:\n  lr: 0.1\n  lr: 0.2\n", "lr", "2 and 3"),
])
def test_a_key_set_twice_in_a_config_file_is_refused_naming_both_lines(tmp_path, capsys, text, key, lines):
    # YAML kept the last: the first model: section's lr was dropped without a word
    twice = tmp_path / "twice.yaml"
    twice.write_text(text)
    assert fit(tmp_path, "-c", str(twice)) == 2
    assert f"config file {twice} sets '{key}' twice (lines {lines})" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("section, typo, close", [("model", "lrr", "model.lr"), ("data", "shot", "data.shots")])
def test_a_misspelt_key_in_one_of_several_config_files_names_that_file_and_the_close_option(tmp_path, capsys,
                                                                                           section, typo, close):
    # jsonargparse said "Group 'model' does not accept option 'lrr'": neither the file nor the option meant
    good, misspelt = tmp_path / "good.yaml", tmp_path / "misspelt.yaml"
    good.write_text("trainer:\n  max_epochs: 1\n")
    misspelt.write_text(f"{section}:\n  {typo}: 3\n")
    assert fit(tmp_path, "-c", str(good), "-c", str(misspelt)) == 2
    err = capsys.readouterr().err
    assert f"config file {misspelt}: {section}.{typo} is no option of" in err and f"did you mean {close}" in err
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("text, typo, close", [
    ("model:\n  adapter:\n    class_path: nola_vision.NOLAConfig\n    init_args: {rnak: 4}\n",
     "model.adapter.init_args.rnak is no option of NOLAConfig", "did you mean model.adapter.init_args.rank"),
    ("model:\n  adapter:\n    class_path: nola_vision.LoRAConfig\n    init_args: {alpah: 4}\n",
     "model.adapter.init_args.alpah is no option of LoRAConfig", "did you mean model.adapter.init_args.alpha"),
    ("trainer:\n  max_epoch: 1\n", "trainer.max_epoch is no option of Trainer", "did you mean trainer.max_epochs"),
])
def test_a_misspelt_adapter_or_trainer_key_in_a_config_file_names_that_file_and_the_close_option(tmp_path, capsys,
                                                                                               text, typo, close):
    """These gave ~90 lines of usage ending in the parser's message, which named neither the file nor the option
    meant."""
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text(text)
    assert fit(tmp_path, "-c", str(misspelt)) == 2
    err = capsys.readouterr().err
    assert f"config file {misspelt}: {typo}" in err and close in err and len(err.splitlines()) <= 3


def test_a_misspelt_top_level_key_in_a_config_file_names_that_file_and_the_close_option(tmp_path, capsys):
    # the parser said "Subcommand 'fit' does not accept option 'seed_everythin'", with no option meant
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text("seed_everythin: 3\n")
    assert fit(tmp_path, "-c", str(misspelt)) == 2
    err = capsys.readouterr().err
    assert f"config file {misspelt}: seed_everythin is no option of nola-vision fit (did you mean seed_everything?" \
        in err and len(err.splitlines()) <= 3
    tested = tmp_path / "tested.yaml"
    tested.write_text(f"verbose: false\nconfig: {TINY}\n")  # test's own option, and a config naming another
    check_config_sources(["test", "-c", str(tested)])
    with pytest.raises(ValueError, match=r"verbose is no option of nola-vision fit \(an option of nola-vision .*test.*"
                                         r", not of fit"):
        check_config_sources(["fit", "-c", str(tested)])
    assert not list(tmp_path.rglob("*.ckpt"))


class _TrainerWithAnOption(L.Trainer):
    def __init__(self, *args, my_option: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.my_option = my_option


def test_the_trainer_keys_of_a_config_file_are_checked_against_the_clis_trainer_class(tmp_path):
    from nola_vision.data import FewShotDataModule
    from nola_vision.train.cli import NolaCLI
    from nola_vision.train.module import FewShotClassifier

    config = tmp_path / "trainer.yaml"
    config.write_text("trainer:\n  my_option: 3\n")
    cli = NolaCLI(FewShotClassifier, FewShotDataModule, trainer_class=_TrainerWithAnOption, run=False,
                  args=["-c", str(TINY), "-c", str(config), "--trainer.logger", "false",
                        "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.my_option == 3


def test_a_value_of_the_wrong_type_is_named_without_the_usage_of_every_option(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        fit(tmp_path, "--model.optimizer", "adamx")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and 'Parser key "model.optimizer"' in err and "--help" in err
    assert len(err.splitlines()) <= 5, err


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("transformer_engine") is not None,
                    reason="Transformer Engine is installed")
def test_a_precision_whose_package_is_missing_names_it_without_a_traceback(tmp_path, capsys):
    # Lightning's ModuleNotFoundError ("transformer_engine>=0.11.0") came with its traceback, exit 1
    assert main(["fit", "-c", str(TINY), "--trainer.precision", "transformer-engine", "--trainer.default_root_dir",
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--trainer.precision transformer-engine needs NVIDIA's Transformer Engine" in err
    assert "Traceback" not in err and not any(tmp_path.iterdir())


def test_a_deeply_nested_config_value_is_refused_quickly_by_name(tmp_path):
    done = subprocess.run([*CLI, "fit", "-c", str(TINY), "--model.adapter", DEEP], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "the value of --model.adapter nests too deeply" in done.stderr and "RecursionError" not in done.stderr


def test_a_deeply_nested_config_file_is_refused_by_name(tmp_path, capsys):
    deep = tmp_path / "deep.yaml"
    deep.write_text(f"model:\n  adapter: {DEEP}\n")
    assert fit(tmp_path, "-c", str(deep)) == 2
    assert f"config file {deep} nests too deeply" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("--seed_everything", "abc", 'Parser key "seed_everything"'),
    ("--data.split_seed", "1.5", 'Parser key "data.split_seed"'),
    ("--data.split_seed", "abc", 'Parser key "data.split_seed"'),
])
def test_a_seed_of_the_wrong_type_is_a_cli_error_naming_the_option(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_:
        fit(tmp_path, option, value)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("--model.adapter.init_args.scale", "nan", "NOLAConfig.scale must be a finite number"),
    ("--model.adapter.init_args.seed", "abc", "NOLAConfig.seed must be an integer"),
    ("--model.label_smoothing", "1.5", "FewShotClassifier.label_smoothing must be a finite number >= 0 and < 1"),
    ("--data.cache_mb", "-1", "FewShotDataModule.cache_mb must be a finite number >= 0"),
    # Lightning's own message named no option: "-5 is not in bounds, numpy accepts from 0 to 4294967295"
    ("--seed_everything", "-5", "--seed_everything must be true, false or an integer from 0 to 4294967295"),
    ("--seed_everything", str(2**32), "(the seeds numpy takes), got 4294967296"),
])
def test_a_value_out_of_range_fails_before_training_naming_the_field(tmp_path, capsys, option, value, message):
    assert fit(tmp_path, option, value) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("given", [["--model.adapter", "lora"], ["--model.adapter=LoRA"]])
def test_options_given_to_a_method_name_are_refused_naming_the_config_class_that_takes_them(tmp_path, capsys, given):
    # the parser dumped the adapter Union's subtypes ("Expected a dot import path string: lora ... NestedArg")
    assert fit(tmp_path, *given, "--model.adapter.targets", "[attn.q,attn.v]") == 2
    assert (f"--model.adapter {given[-1].partition('=')[2] or given[-1]} names a method with its default settings, "
            "which takes no options, so --model.adapter.targets has nothing to set: give its config class instead, "
            "--model.adapter LoRAConfig --model.adapter.targets ...") in " ".join(capsys.readouterr().err.split())
    assert not list(tmp_path.rglob("*.ckpt"))


def test_options_given_to_a_method_name_from_a_config_file_are_refused_too(tmp_path, capsys):
    # a -c file's `adapter: linear` then --model.adapter.rank: the parser's Union dump ("NestedArg(key='rank')")
    linear = _written(tmp_path / "linear.yaml", "model:\n  adapter: linear\n")
    assert fit(tmp_path, "-c", linear, "--model.adapter.rank", "4") == 2
    assert (f"-c {linear} (its model.adapter: linear) names a method with its default settings, which takes no "
            "options, so --model.adapter.rank has nothing to set: LinearProbeConfig has no rank either; LoRAConfig, "
            "NOLAConfig") in " ".join(capsys.readouterr().err.split())
    lora = _written(tmp_path / "lora.yaml", "adapter: lora\n")
    assert fit(tmp_path, "--model", lora, "--model.adapter.targets", "[attn.q]") == 2
    assert "give its config class instead, --model.adapter LoRAConfig --model.adapter.targets" in \
        " ".join(capsys.readouterr().err.split())
    assert not list(tmp_path.rglob("*.ckpt"))


def test_the_parsers_own_options_after_a_method_name_are_left_to_it(tmp_path):
    # --model.adapter.help and a class switch by --model.adapter.class_path after `adapter: linear` were refused
    linear = _written(tmp_path / "linear.yaml", "model:\n  adapter: linear\n")
    for args in (["--model.adapter.help", "LoRAConfig"],
                 ["--model.adapter.class_path", "LoRAConfig", "--model.adapter.init_args.rank", "2"]):
        check_config_sources(["fit", "-c", str(TINY), "-c", linear, *args])


def test_an_init_args_key_no_adapter_class_takes_is_named_without_a_class_path(tmp_path, capsys):
    # init_args for the class set before (no class_path) with a typo: the parser's Union dump
    typo = _written(tmp_path / "typo.yaml", "model:\n  adapter:\n    init_args:\n      rnk: 4\n")
    assert fit(tmp_path, "-c", typo) == 2
    assert (f"config file {typo}: model.adapter.init_args.rnk is an option of no adapter config class (did you mean "
            "model.adapter.init_args.rank?") in " ".join(capsys.readouterr().err.split())
    assert not list(tmp_path.rglob("*.ckpt"))


def test_switching_the_adapter_class_on_the_command_line_names_the_settings_it_kept(tmp_path):
    # jsonargparse keeps the init args the new class accepts: LoRA trained on NOLA's mlp targets, silently
    args = ["--model.adapter", "LoRAConfig", "--trainer.max_epochs", "1", "--test_after_fit", "false"]
    with pytest.warns(UserWarning, match=r"--model.adapter LoRAConfig kept the earlier adapter's "
                      r"targets=\['mlp.fc1', 'mlp.fc2'\] \(LoRAConfig's default: \['attn.q', 'attn.v'\]\)"):
        assert fit(tmp_path, *args) == 0
    for given in (["--model.adapter.targets", "[mlp.fc1]"], ["--model.adapter.init_args.targets=[mlp.fc1]"]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert fit(tmp_path / given[0][:20], *args, *given) == 0
        assert not [w for w in caught if "kept the earlier adapter" in str(w.message)]
    # the same class under its defining module's path: nothing switched, nothing to warn about
    full = tmp_path / "full.yaml"
    full.write_text("model:\n  adapter:\n    class_path: nola_vision.methods.nola.config.NOLAConfig\n"
                    "    init_args: {num_basis_a: 64, num_basis_b: 64}\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fit(tmp_path / "same", "-c", str(full), "--model.adapter", "NOLAConfig", "--trainer.max_epochs", "1",
                   "--test_after_fit", "false") == 0
    assert not [w for w in caught if "kept the earlier adapter" in str(w.message)]


@pytest.mark.parametrize("form", ["class name in a -c file", "--model file", "inline -c YAML", "nested model file"])
def test_every_way_of_naming_another_adapter_class_names_the_settings_it_kept(tmp_path, form):
    # only --model.adapter and class_path mappings in -c files warned: these trained LoRA on NOLA's targets silently
    (tmp_path / "model.yaml").write_text("adapter: LoRAConfig\n")
    (tmp_path / "nested.yaml").write_text("model: model.yaml\n")  # relative to the file that names it
    given = {"class name in a -c file": ["-c", _written(tmp_path / "lora.yaml", "model:\n  adapter: LoRAConfig\n")],
             "--model file": ["--model", str(tmp_path / "model.yaml")],
             "inline -c YAML": ["--config", "{model: {adapter: LoRAConfig}}"],
             "nested model file": ["-c", str(tmp_path / "nested.yaml")]}[form]
    with pytest.warns(UserWarning, match=r"\(its model.adapter LoRAConfig\) kept the earlier adapter's "
                      r"targets=\['mlp.fc1', 'mlp.fc2'\]"):
        assert fit(tmp_path / "run", *given, "--trainer.max_epochs", "1", "--test_after_fit", "false") == 0


def _written(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("setting, shown", [("0", False), ("false", False), ("", False), ("1", True)])
def test_the_traceback_setting_reads_0_and_false_as_off(tmp_path, monkeypatch, capsys, setting, shown):
    # any value showed it: NOLA_VISION_TRACEBACK=0 raised the error with its traceback
    monkeypatch.setenv("NOLA_VISION_TRACEBACK", setting)
    bad = ["--trainer.max_epochs", "0"]
    if shown:
        with pytest.raises(ValueError, match="trains nothing"):
            fit(tmp_path, *bad)
    else:
        assert fit(tmp_path, *bad) == 2
        assert "trains nothing" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--data.image_size", "48"], ["--data.init_args.backbone=vit_base_patch16_224"],
                                  ["-c", "linked.yaml"]])
def test_a_data_option_linked_from_the_model_is_refused_naming_the_model_option(tmp_path, capsys, args):
    # in a file it was dropped (the run trained at the backbone's default 224 px); on the command line the parser
    # said "argument model.image_size --> data.image_size: invalid Optional value: '48'"
    (tmp_path / "linked.yaml").write_text("data:\n  image_size: 48\n")
    args = [str(tmp_path / a) if a == "linked.yaml" else a for a in args]
    assert fit(tmp_path, *args) == 2
    err = capsys.readouterr().err
    option = "backbone" if "backbone" in " ".join(args) else "image_size"
    assert f"data.{option} is set from model.{option}" in err
    assert f"set model.{option} (--model.{option}) instead" in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_the_models_class_count_is_named_as_the_datas_whichever_way_it_is_given(tmp_path, capsys):
    # on the command line the parser said it "must be given via data.num_classes", an option that does not exist; in
    # a file or a --model value it was dropped without a word (a 10-class head on the digits)
    assert fit(tmp_path, "--model.num_classes", "5") == 2
    assert "model.num_classes is the data's class count (FewShotDataModule.num_classes" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))
    (tmp_path / "nc.yaml").write_text("model:\n  num_classes: 5\n")
    for args in (['--model={"num_classes": 5}'], ["-c", str(tmp_path / "nc.yaml")]):
        with pytest.warns(UserWarning, match=r"model.num_classes is the data's class count .*: its value is ignored"):
            check_config_sources(["fit", "-c", str(TINY), *args])


@pytest.mark.parametrize("route", ["--data file", "group file in a -c file", "fit: section before the subcommand",
                                   "--data inline"])
def test_a_linked_or_misspelt_data_option_is_refused_whichever_file_or_value_gives_it(tmp_path, capsys, route):
    # image_size/backbone from these routes were dropped without a word (the run trained at 32 px on the tiny model)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data64.yaml").write_text("image_size: 64\nshots: 3\n")
    (tmp_path / "sub" / "grouped.yaml").write_text("data: data64.yaml\n")
    (tmp_path / "nested.yaml").write_text("fit:\n  data:\n    image_size: 64\n")
    args = {"--data file": ["fit", "-c", str(TINY), "--data", str(tmp_path / "sub" / "data64.yaml")],
            "group file in a -c file": ["fit", "-c", str(TINY), "-c", str(tmp_path / "sub" / "grouped.yaml")],
            "fit: section before the subcommand": ["-c", str(tmp_path / "nested.yaml"), "fit", "-c", str(TINY)],
            "--data inline": ["fit", "-c", str(TINY), '--data={"image_size": 64}']}[route]
    assert main([*args, "--trainer.default_root_dir", str(tmp_path)]) == 2
    assert "data.image_size is set from model.image_size" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))
    assert main(["fit", "-c", str(TINY), '--data={"shotz": 3}', "--trainer.default_root_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "the value of --data: data.shotz is no option of FewShotDataModule (did you mean data.shots?" in err
    listed = err.split("its options: ")[1].split(")")[0].split(", ")
    assert "root" in listed and "image_size" not in listed and "backbone" not in listed  # linked: refused when set


def test_a_null_adapter_in_a_config_file_is_a_cli_error_naming_the_option(tmp_path, capsys):
    # was a bare TypeError traceback, exit 1
    (tmp_path / "null.yaml").write_text("model:\n  adapter: null\n")
    assert fit(tmp_path, "-c", str(tmp_path / "null.yaml")) == 2
    assert "FewShotClassifier.adapter is null: name a method" in capsys.readouterr().err


def test_a_misspelt_key_in_an_inline_adapter_value_names_the_close_option(tmp_path, capsys):
    # was "unknown adapter '{...the whole JSON...}'", never naming rnak
    assert fit(tmp_path, "--model.adapter", '{"class_path": "nola_vision.LoRAConfig", "init_args": {"rnak": 2}}') == 2
    assert ("the value of --model.adapter: model.adapter.init_args.rnak is no option of LoRAConfig (did you mean "
            "model.adapter.init_args.rank?") in capsys.readouterr().err


def test_the_repeated_key_check_follows_what_yaml_builds(tmp_path, capsys):
    from nola_vision.train.cli import _check_yaml

    _check_yaml("{1: a, '1': b}", "one")  # two keys: an int and a string
    _check_yaml("b: &b {x: 1}\nc:\n  <<: *b\n  x: 2\n", "merged")  # a merge key, then an override
    with pytest.raises(ValueError, match=r"sets 'null' twice"):
        _check_yaml("{~: 1, null: 2}", "nulls")
    looped = tmp_path / "looped.yaml"  # an anchor holding itself: the walk hung
    looped.write_text("model: &m\n  backbone: vit_tiny_patch16_224\n  extra: *m\n")
    assert fit(tmp_path, "-c", str(looped)) == 2
    assert f"config file {looped}: an alias (*name) refers to a value that holds it" in capsys.readouterr().err
    scalar = tmp_path / "scalar.yaml"  # before the subcommand: not a mapping (was an IndexError traceback)
    scalar.write_text("foo\n")
    with pytest.raises(SystemExit) as exited:  # the parser's own "Unexpected config: foo"
        main(["-c", str(scalar), "fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path)])
    assert exited.value.code == 2 and "Unexpected config: foo" in capsys.readouterr().err


def test_a_later_config_file_switching_the_adapter_class_names_the_settings_it_kept(tmp_path):
    # only --model.adapter warned: a later -c file naming LoRAConfig trained LoRA on NOLA's mlp targets silently
    lora = tmp_path / "lora.yaml"
    lora.write_text("model:\n  adapter:\n    class_path: nola_vision.LoRAConfig\n")
    with pytest.warns(UserWarning, match=rf"-c {re.escape(str(lora))} \(its model.adapter LoRAConfig\) kept the "
                      r"earlier adapter's targets=\['mlp.fc1', 'mlp.fc2'\]"):
        assert fit(tmp_path / "run", "-c", str(lora), "--trainer.max_epochs", "1", "--test_after_fit", "false") == 0
    lora.write_text("model:\n  adapter:\n    class_path: nola_vision.LoRAConfig\n"
                    "    init_args: {targets: [attn.q, attn.v], rank: 4}\n")  # given by the file: nothing carried
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fit(tmp_path / "given", "-c", str(lora), "--trainer.max_epochs", "1", "--test_after_fit", "false") == 0
    assert not [w for w in caught if "kept the earlier adapter" in str(w.message)]


LAUGHS = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9))


@pytest.mark.parametrize("yaml_text, says", [
    ("a: &a [*a]\n", "refers to a value that holds it"),  # a RecursionError of ~3,000 lines, exit 1
    (LAUGHS, "expand it to more than 100,000 values"),  # the parser built it for ever
])
def test_a_config_file_whose_aliases_never_end_is_refused_naming_it(tmp_path, capsys, yaml_text, says):
    config = tmp_path / "aliases.yaml"
    config.write_text(yaml_text)
    assert fit(tmp_path, "-c", str(config)) == 2
    err = capsys.readouterr().err
    assert f"config file {config}: its aliases" in err or f"config file {config}: an alias" in err
    assert says in err and "Traceback" not in err


@pytest.mark.parametrize("option, value, says", [
    ("--trainer.devices", "-2", "--trainer: `devices` selected with `CPUAccelerator` should be an int > 0"),
    ("--model.backbone_kwargs", "{depth: -1, patch_size: 8, embed_dim: 64, num_heads: 2}",
     "do not fit timm vit_tiny_patch16_224: number of steps must be non-negative"),
    ("--trainer.accumulate_grad_batches", str(10**30), "--trainer.accumulate_grad_batches"),
    ("--data.batch_size", str(10**30), "FewShotDataModule.batch_size must be an integer in torch's int64 range"),
])
def test_values_lightning_timm_or_python_failed_on_are_refused_in_one_line(tmp_path, capsys, option, value, says):
    # tracebacks of 40 to 70 lines, exit 1: a TypeError from Lightning, a RuntimeError from timm, an OverflowError
    assert fit(tmp_path, "--trainer.logger", "false", "--trainer.max_epochs", "1", option, value) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and not list(tmp_path.rglob("*.ckpt"))


def test_an_empty_output_path_is_refused_not_taken_for_none(tmp_path, capsys):
    # --result_file '' trained and wrote no result, without a word
    assert fit(tmp_path, "--trainer.logger", "false", "--result_file", "") == 2
    assert "--result_file is empty: pass a file path" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_data_root_through_a_link_and_dotdot_reads_the_folder_the_system_opens(tmp_path, monkeypatch):
    # lnk/../imgs was made absolute as text (os.path.abspath dropped lnk/..): it read work/imgs, another data set,
    # silently, instead of the real/imgs that `ls lnk/../imgs` lists
    from test_protocol_checks import image_folder

    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "lnk").symlink_to(tmp_path / "real" / "deep")
    image_folder(tmp_path / "real" / "imgs", test_per_class=1)  # classes a, b
    for label in ("x", "y", "z"):  # the decoy beside the link
        (tmp_path / "work" / "imgs" / "train" / label).mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    assert fit(tmp_path / "out", "--data.dataset", "imagefolder", "--data.root", "lnk/../imgs", "--data.shots", "2",
               "--data.val_shots", "0", "--trainer.max_epochs", "1", "--test_after_fit", "false") == 0
    saved = json.loads(next((tmp_path / "out").rglob("adapter_config.json")).read_text())
    assert saved["class_names"] == ["a", "b"]


@pytest.mark.parametrize("naming", ["--model.adapter", "class_path in a file", "class name in a file"])
def test_an_init_args_key_of_a_custom_method_named_before_it_is_not_refused(tmp_path, naming):
    # a -c file's init_args without class_path for a custom class named before it: its module was not imported yet
    # when the files were checked, so its own option read as "an option of no adapter config class"
    (tmp_path / "widened.py").write_text(
        "from dataclasses import dataclass\nimport nola_vision as nv\n"
        "from example_method import FrozenAConfig, FrozenALinear\n\n"
        "@dataclass\nclass WidenedConfig(FrozenAConfig):\n    spread: float = 1.0\n    method = 'widened'\n\n"
        "nv.register_method('widened', WidenedConfig, FrozenALinear)\n")
    tweak = _written(tmp_path / "tweak.yaml", "model:\n  adapter:\n    init_args:\n      spread: 2.0\n")
    typo = _written(tmp_path / "typo.yaml", "model:\n  adapter:\n    init_args:\n      spraed: 2.0\n")
    named = {"--model.adapter": ["--model.adapter", "widened.WidenedConfig"],
             "class_path in a file": ["-c", _written(tmp_path / "c.yaml", "model:\n  adapter:\n    class_path: "
                                                           "widened.WidenedConfig\n")],
             "class name in a file": ["-c", _written(tmp_path / "n.yaml", "model:\n  adapter: "
                                                           "widened.WidenedConfig\n")]}[naming]
    code = ("import sys\nfrom nola_vision.train.cli import check_config_sources\n"
            f"check_config_sources(['fit', '-c', {str(TINY)!r}, *{named!r}, '-c', {tweak!r}])"
            f"\ntry:\n    check_config_sources(['fit', '-c', {str(TINY)!r}, '-c', {typo!r}])\n"
            "except ValueError as error:\n    print(error)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parent)])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "init_args.spraed is an option of no adapter config class" in done.stdout  # still a typo to the others


def test_an_in_process_run_keeps_nothing_of_itself_alive_once_it_returns(tmp_path):
    # jsonargparse's context variable of its last parser held the run's trainer, model (with its backbone) and data
    # module (with its datasets) alive after main returned, until the next call: a notebook's memory stayed taken
    import gc

    from nola_vision.train.module import FewShotClassifier

    def alive():
        gc.collect()
        return sum(isinstance(o, FewShotClassifier) for o in gc.get_objects())

    before = alive()
    assert fit(tmp_path, "--trainer.max_epochs", "1", "--data.shots", "2", "--test_after_fit", "false") == 0
    assert alive() == before


def test_a_deterministic_run_in_process_leaves_torchs_algorithm_settings_as_they_were(tmp_path):
    # Lightning turned on deterministic algorithms for the whole process and nothing turned them off: a notebook's
    # later runs and code kept them (and raised where an operation has no deterministic implementation)
    import os

    import torch

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    assert fit(tmp_path, "--trainer.max_epochs", "1", "--data.shots", "2", "--test_after_fit", "false",
               "--trainer.deterministic", "true", "--trainer.benchmark", "true") == 0
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
            os.environ.get("CUBLAS_WORKSPACE_CONFIG")) == before
