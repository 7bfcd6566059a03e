"""FewShotClassifier refuses, before its first step, a fit that would train or record something other than asked: a
resume with other training settings, data preprocessed or labelled for another model, trainable flags or quantisation
set by hand, Adam on float16 weights, parameters outside its model. Each fit resolves the recipe's warm-up anew."""
import re
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from fixtures_data import write_imagefolder
from test_module import NOLA, TINY, loader, trainer
from torch.utils.data import DataLoader, TensorDataset

import nola_vision as nv
from nola_vision.data import FewShotDataModule
from nola_vision.train.module import FewShotClassifier


def module(**hparams) -> FewShotClassifier:
    return FewShotClassifier(**{"num_classes": 4, "adapter": NOLA, "lr": 1e-2, "head_lr": 1e-2, "warmup_epochs": 0,
                                **TINY, **hparams})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of a 1-epoch run of ``module()``."""
    root = tmp_path_factory.mktemp("run")
    L.seed_everything(0)
    trainer(root, epochs=1).fit(module(), loader())
    return next((root / "checkpoints").glob("*.ckpt"))


@pytest.fixture
def folder_root(tmp_path):
    write_imagefolder(tmp_path / "pets", train_per_class=4, eval_per_class=1, eval_folder="test")
    return tmp_path / "pets"


def refused_before_a_step(run: L.Trainer, fit, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit()
    assert run.global_step == 0


# ---- F1: a resume keeps the run's training settings ------------------------------------------------------------

@pytest.mark.parametrize("changed, shown", [
    (dict(lr=0.5, head_lr=0.5), "lr=0.5 (checkpoint: 0.01); head_lr=0.5 (checkpoint: 0.01)"),
    (dict(weight_decay=0.1, label_smoothing=0.0), "weight_decay=0.1 (checkpoint: 0.0); label_smoothing=0.0"),
    (dict(optimizer="sgd"), "optimizer='sgd' (checkpoint: 'adam')"),  # was a bare KeyError 'momentum'
])
def test_resuming_through_the_trainer_with_other_training_hparams_is_refused_naming_them(checkpoint, tmp_path,
                                                                                        changed, shown):
    run = trainer(tmp_path, epochs=3)
    refused_before_a_step(run, lambda: run.fit(module(**changed), loader(), ckpt_path=checkpoint),
                          re.escape(shown) + ".*load_from_checkpoint")


def test_resuming_with_the_runs_values_or_the_recipes_null_warmup_trains_on(checkpoint, tmp_path):
    for name, model in (("loaded", FewShotClassifier.load_from_checkpoint(checkpoint)),
                        ("null_warmup", module(warmup_epochs=None))):  # the recipe's, resolved: no change
        run = trainer(tmp_path / name, epochs=2, enable_checkpointing=False)
        run.fit(model, loader(), ckpt_path=checkpoint)
        assert run.global_step == 4 + 4


def test_the_cli_and_the_module_compare_hyperparameters_alike():
    from nola_vision.train.module import RESOLVED_FROM_NONE, changed_hparams

    saved = {"lr": 0.03, "head_lr": 0.01, "warmup_epochs": 2, "min_lr": 1e-6}
    assert changed_hparams(saved, {key: None for key in RESOLVED_FROM_NONE}, saved) == {}
    assert changed_hparams(saved, {**saved, "lr": 0.5, "min_lr": None}, saved) == {"lr": (0.5, 0.03),
                                                                                   "min_lr": (None, 1e-6)}


# ---- F2, F3: the data fits the model -----------------------------------------------------------------------------

@pytest.mark.parametrize("data, shown", [
    (dict(image_size=32), r"no backbone \(ImageNet's mean and std\), not for this model's: mean \(0.485, 0.456, "
                          r"0.406\) \(the model's: \(0.5, 0.5, 0.5\)\)"),
    (dict(backbone="vit_small_patch14_dinov2", image_size=32), "backbone 'vit_small_patch14_dinov2'.*mean"),
    (dict(backbone="vit_tiny_patch16_224"), r"input_size 224 \(the model's: 32\)"),
])
def test_a_datamodule_preprocessing_for_another_backbone_is_refused_at_fit_and_test(folder_root, tmp_path, data,
                                                                                    shown):
    datamodule = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, batch_size=2, **data)
    match = shown + r".*backbone='vit_tiny_patch16_224', image_size=32"
    run = trainer(tmp_path)
    refused_before_a_step(run, lambda: run.fit(module(num_classes=3), datamodule=datamodule), match)
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path).test(module(num_classes=3), datamodule=datamodule)


@pytest.mark.parametrize("normalize", ["model", "imagenet"])  # imagenet: the user's own choice of mean and std
def test_a_datamodule_of_the_models_backbone_and_size_trains(folder_root, tmp_path, normalize):
    datamodule = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, batch_size=2, image_size=32,
                                   backbone="vit_tiny_patch16_224", normalize=normalize)
    run = trainer(tmp_path, epochs=1, limit_train_batches=1)
    run.fit(module(num_classes=3, adapter_dir=str(tmp_path / "adapter")), datamodule=datamodule)
    assert run.global_step == 1


def test_a_head_of_another_class_count_than_the_data_is_refused_before_training(folder_root, tmp_path):
    datamodule = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, batch_size=2, image_size=32,
                                   backbone="vit_tiny_patch16_224")
    run = trainer(tmp_path)
    refused_before_a_step(run, lambda: run.fit(FewShotClassifier(adapter=NOLA, **TINY), datamodule=datamodule),
                          r"the data has 3 classes, the model's head 10 outputs .*num_classes=3")


# ---- F4, F5, F8: what trains is what the files hold -------------------------------------------------------------

def test_trainable_flags_changed_by_hand_are_refused_before_training(tmp_path):
    unfrozen = module()
    unfrozen.model.norm.weight.requires_grad_(True)
    run = trainer(tmp_path / "unfrozen")
    refused_before_a_step(run, lambda: run.fit(unfrozen, loader()), r"not part of an adapter file: \['norm.weight'\]")
    frozen = module()
    frozen.model.head.requires_grad_(False)
    run = trainer(tmp_path / "frozen")
    refused_before_a_step(run, lambda: run.fit(frozen, loader()), r"'nola' trains are frozen .*model.head.weight")
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("quant_bits, by_hand, shown", [
    (None, 4, "quantisation-aware at 4 bits .*quant_bits is None.*quant_bits=4 on FewShotClassifier"),
    (4, None, "not quantisation-aware .*quant_bits is 4.*quant_bits=None on FewShotClassifier"),
])
def test_quantisation_aware_training_set_by_hand_is_refused_before_training(tmp_path, quant_bits, by_hand, shown):
    model = module(quant_bits=quant_bits)
    nv.set_quantization_aware(model.model, by_hand)
    run = trainer(tmp_path)
    refused_before_a_step(run, lambda: run.fit(model, loader()), shown)
    # set on hparams instead: blamed "nv.set_quantization_aware by hand?", which nobody called
    model = module(quant_bits=by_hand)
    model.hparams.quant_bits = quant_bits
    run = trainer(tmp_path / "hparams")
    refused_before_a_step(run, lambda: run.fit(model, loader()), rf"hparams.quant_bits is {quant_bits}, set after the "
                          rf"model was built .*Build a new FewShotClassifier with quant_bits={quant_bits}, or set it "
                          rf"back to {by_hand}")


def test_a_checkpoint_trained_without_quantisation_says_so():
    checkpoint = {"state_dict": module().state_dict()}
    module().on_save_checkpoint(checkpoint)
    with pytest.raises(ValueError, match=r"trained without quantisation-aware training, this model at 4 bits.*"
                                         r"quant_bits=None"):
        module(quant_bits=4).on_load_checkpoint(checkpoint)


def test_a_trainable_parameter_outside_the_model_is_refused_naming_it(tmp_path):
    class WithTemperature(FewShotClassifier):
        def __init__(self, **hparams):
            super().__init__(**hparams)
            self.logit_scale = torch.nn.Parameter(torch.zeros(()))

    model = WithTemperature(num_classes=4, adapter=NOLA, **TINY)
    run = trainer(tmp_path)
    refused_before_a_step(run, lambda: run.fit(model, loader()),
                          r"\['logit_scale'\] are outside FewShotClassifier.model")


# ---- F6, F7: the schedule and the optimiser ----------------------------------------------------------------------

def test_each_fit_resolves_the_recipes_warmup_for_its_own_epochs():
    model = module(warmup_epochs=None)
    for epochs, warmup in ((4, 1), (20, 2), (4, 1)):  # NOLA's recipe: a tenth of the epochs, rounded, at least 1
        model.trainer = L.Trainer(max_epochs=epochs, logger=False)
        model.configure_optimizers()
        assert model.hparams.warmup_epochs == warmup  # the value this fit used, for its checkpoints


@pytest.mark.parametrize("epochs, warmup", [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (14, 1), (15, 2)])
def test_the_recipes_warmup_is_at_least_an_epoch_where_the_run_has_room_for_it(epochs, warmup):
    # a tenth of 3 or 4 epochs rounded to none: NOLA started at its recipe's 3e-2 and diverged to chance
    from nola_vision.train.recipe import recipe_warmup_epochs

    assert recipe_warmup_epochs(NOLA, epochs) == warmup
    assert recipe_warmup_epochs(nv.LoRAConfig(), epochs) == 0  # LoRA's recipe has none


def warnings_of_configure_optimizers(epochs: int, **hparams) -> str:
    model = module(**hparams)
    model.trainer = L.Trainer(max_epochs=epochs, logger=False)
    with pytest.warns() as caught:
        model.configure_optimizers()
        __import__("warnings").warn("end")  # pytest.warns needs one
    return " | ".join(str(w.message) for w in caught)


def test_a_schedule_the_warmup_leaves_no_room_in_warns():
    said = warnings_of_configure_optimizers(2, lr=None, head_lr=None, warmup_epochs=None)
    assert "nola's recipe lr=0.03 assumes a warm-up (10% of the epochs, at least 1), and a run of " \
           "trainer.max_epochs=2 has no room for one" in said and "Train 3 or more epochs" in said
    assert "(NOLA diverges from 3e-2 without a warm-up)" in said
    # another method's recipe: no word of NOLA's rate (a linear probe was told NOLA diverges from 3e-2)
    said = warnings_of_configure_optimizers(2, adapter="linear", lr=None, head_lr=None, warmup_epochs=None)
    assert "linear's recipe lr=0.01 assumes a warm-up" in said and "NOLA" not in said
    assert "no room" not in warnings_of_configure_optimizers(2, warmup_epochs=None)  # lr given: the user's choice
    assert "no room" not in warnings_of_configure_optimizers(3, lr=None, head_lr=None, warmup_epochs=None)
    said = warnings_of_configure_optimizers(3, warmup_epochs=2)  # epochs at lr/3, 2lr/3, then lr: never decayed
    assert "warmup_epochs=2 leaves one of trainer.max_epochs=3 after the warm-up, and it trains at the peak" in said
    assert "leaves one" not in warnings_of_configure_optimizers(3, warmup_epochs=1)
    assert "is not below trainer.max_epochs=3" in warnings_of_configure_optimizers(3, warmup_epochs=3)


class TimeUpAfterOneEpoch(__import__("lightning").pytorch.callbacks.Timer):
    """trainer.max_time's Timer, whose time is up at the end of the first epoch."""

    def __init__(self):
        super().__init__(duration={"hours": 1}, interval="epoch")
        self.up = False

    def time_elapsed(self, stage="train"):
        return 7200.0 if self.up else 0.0

    def on_train_epoch_end(self, trainer, pl_module):
        self.up = True
        super().on_train_epoch_end(trainer, pl_module)


def test_a_fit_that_max_time_stops_early_warns_that_its_schedule_never_decayed(tmp_path):
    run = trainer(tmp_path, epochs=5, callbacks=[TimeUpAfterOneEpoch()], enable_checkpointing=False)
    with pytest.warns(UserWarning, match=r"trainer.max_time stopped the fit with 1 of max_epochs=5 epochs done.*"
                                         r"stopped at lr 0.00905, 0.00905, never decaying to min_lr=1e-06"):
        run.fit(module(), loader())
    assert run.current_epoch == 1


class TimeUpInsideTheSecondEpoch(TimeUpAfterOneEpoch):
    """trainer.max_time's Timer, whose time is up after the second epoch's first batch."""

    def __init__(self):
        super().__init__()
        self._interval = "step"

    def on_train_epoch_end(self, trainer, pl_module):
        pass

    def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
        self.up = trainer.current_epoch == 1
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)


def test_a_max_time_stop_inside_an_epoch_counts_the_whole_epochs_as_the_result_does(tmp_path):
    """Stopped one batch into the second epoch, the warning said "2 of max_epochs=5 epochs done" while the result
    recorded 1 (Lightning counts the epoch it stopped inside as done)."""
    run = trainer(tmp_path, epochs=5, callbacks=[TimeUpInsideTheSecondEpoch()], enable_checkpointing=False)
    with pytest.warns(UserWarning, match=r"trainer.max_time stopped the fit with 1 of max_epochs=5 epochs done"):
        run.fit(module(), loader())
    assert run.global_step == len(loader()) + 1


def test_a_resume_keeps_the_warmup_its_run_resolved_as_the_cli_does(tmp_path):
    run = trainer(tmp_path / "first", epochs=1, limit_train_batches=1)
    run.fit(module(warmup_epochs=None), loader())  # the recipe's share of 1 epoch: 0
    resumed = module(warmup_epochs=None)  # the recipe's share of 20 epochs would be 2
    run = trainer(tmp_path / "resumed", epochs=20, limit_train_batches=1, enable_checkpointing=False)
    run.fit(resumed, loader(), ckpt_path=next((tmp_path / "first" / "checkpoints").glob("*.ckpt")))
    assert resumed.hparams.warmup_epochs == 0  # the run's, not the recipe's share of the longer run (2)


def test_adam_on_float16_weights_is_refused_before_training(tmp_path):
    run = trainer(tmp_path, precision="16-true")
    refused_before_a_step(run, lambda: run.fit(module(), loader()), "Adam cannot train float16 .*'16-mixed'")


def test_the_size_a_backbone_was_built_for_in_backbone_kwargs_is_the_one_compared(folder_root, tmp_path):
    kwargs = {**TINY["backbone_kwargs"], "img_size": 32}
    built = dict(TINY, image_size=None, backbone_kwargs=kwargs)
    datamodule = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, batch_size=2, image_size=32,
                                   backbone="vit_tiny_patch16_224")
    run = trainer(tmp_path / "same", epochs=1, limit_train_batches=1)
    run.fit(module(num_classes=3, adapter_dir=str(tmp_path / "adapter"), **built), datamodule=datamodule)
    assert run.global_step == 1
    wide = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, batch_size=2, image_size=224,
                             backbone="vit_tiny_patch16_224")
    run = trainer(tmp_path / "other")
    refused_before_a_step(run, lambda: run.fit(module(num_classes=3, **built), datamodule=wide),
                          r"input_size 224 \(the model's: 32\).*image_size=32")


# ---- N1: a checkpoint loaded without a trainer keeps its data record for every later stage ------------------------

STAGES = ("validate", "test", "predict")


def datamodule(root, **settings) -> FewShotDataModule:
    return FewShotDataModule("imagefolder", root=str(root), shots=2, val_shots=1, batch_size=2, image_size=32,
                             backbone="vit_tiny_patch16_224", **settings)


@pytest.fixture(scope="module")
def data_checkpoint(tmp_path_factory):
    """A checkpoint of a 1-epoch run of ``module(num_classes=3)`` on a cat/dog/owl folder, and that folder."""
    root = tmp_path_factory.mktemp("data_run")
    write_imagefolder(root / "pets", train_per_class=4, eval_per_class=1, eval_folder="test")
    L.seed_everything(0)
    trainer(root / "run", epochs=1).fit(module(num_classes=3, adapter_dir=str(root / "adapter")),
                                        datamodule=datamodule(root / "pets"))
    return next((root / "run" / "checkpoints").glob("*.ckpt")), root / "pets"


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("other, shown", [
    ("classes", r"trained on classes \['cat', 'dog', 'owl'\], the data has \['ant', 'bee', 'fly'\] \(class 0 was "
                r"'cat', it is 'ant'\)"),
    ("normalize", r"preprocessed evaluation images as .*Pass the run's --data.normalize"),
])
def test_a_loaded_checkpoint_is_refused_on_other_data_at_every_stage_as_through_ckpt_path(data_checkpoint, tmp_path,
                                                                                          stage, other, shown):
    ckpt, pets = data_checkpoint
    if other == "classes":
        write_imagefolder(tmp_path / "bugs", classes=("ant", "bee", "fly"), eval_per_class=1, eval_folder="test")
        data = datamodule(tmp_path / "bugs")
    else:
        data = datamodule(pets, normalize="imagenet")
    with pytest.raises(ValueError, match=shown):  # was: the other data's accuracy, reported as the checkpoint's
        getattr(trainer(tmp_path), stage)(FewShotClassifier.load_from_checkpoint(ckpt), datamodule=data)
    with pytest.raises(ValueError, match=shown):
        getattr(trainer(tmp_path), stage)(module(num_classes=3), datamodule=data, ckpt_path=ckpt)


def test_a_loaded_checkpoint_evaluates_on_its_own_data_and_resumes_from_itself(data_checkpoint, tmp_path):
    ckpt, pets = data_checkpoint
    loaded = FewShotClassifier.load_from_checkpoint(ckpt)
    for stage in STAGES:
        assert getattr(trainer(tmp_path), stage)(loaded, datamodule=datamodule(pets))
    assert trainer(tmp_path).test(loaded, datamodule=datamodule(pets), ckpt_path=ckpt)
    run = trainer(tmp_path / "resumed", epochs=2, enable_checkpointing=False)
    run.fit(loaded, datamodule=datamodule(pets), ckpt_path=ckpt)
    assert run.global_step > 0


def test_a_copied_or_pickled_loaded_checkpoint_keeps_its_data_record_outside_its_hyperparameters(data_checkpoint,
                                                                                                tmp_path):
    import copy
    import pickle

    ckpt, _ = data_checkpoint
    loaded = FewShotClassifier.load_from_checkpoint(ckpt)
    assert dict(loaded.hparams) == dict(FewShotClassifier.load_from_checkpoint(ckpt, strict=False).hparams)
    assert "cat" not in str(dict(loaded.hparams))
    write_imagefolder(tmp_path / "bugs", classes=("ant", "bee", "fly"), eval_per_class=1, eval_folder="test")
    for copied in (copy.deepcopy(loaded), pickle.loads(pickle.dumps(loaded))):
        with pytest.raises(ValueError, match=r"trained on classes \['cat', 'dog', 'owl'\]"):
            trainer(tmp_path).test(copied, datamodule=datamodule(tmp_path / "bugs"))


@pytest.mark.parametrize("stage", STAGES)
def test_a_head_of_another_class_count_than_the_data_is_refused_at_every_stage(folder_root, tmp_path, stage):
    with pytest.raises(ValueError, match=r"the data has 3 classes, the model's head 4 outputs .*num_classes=3"):
        getattr(trainer(tmp_path), stage)(module(num_classes=4), datamodule=datamodule(folder_root))


# ---- N3: a resume keeps the run's backbone regularisers ----------------------------------------------------------

@pytest.mark.parametrize("regulariser", ["drop_path_rate", "drop_rate", "attn_drop_rate", "proj_drop_rate",
                                         "pos_drop_rate", "patch_drop_rate"])
def test_resuming_through_the_trainer_with_other_backbone_regularisers_is_refused_naming_them(checkpoint, tmp_path,
                                                                                             regulariser):
    kwargs = {**TINY["backbone_kwargs"], regulariser: 0.5}
    run = trainer(tmp_path, epochs=3)
    refused_before_a_step(run, lambda: run.fit(module(backbone_kwargs=kwargs), loader(), ckpt_path=checkpoint),
                          re.escape(f"backbone_kwargs.{regulariser}=0.5 (checkpoint: None)") + ".*load_from_checkpoint")


# ---- the data these weights were trained on: a trainer's ckpt_path, and this module's own fit ----------------------

def test_a_trainers_ckpt_path_is_compared_with_its_own_data_not_the_weights_the_module_held(data_checkpoint,
                                                                                            tmp_path):
    """A module loaded from checkpoint A, then tested with ``ckpt_path=B``, is evaluated with B's weights: B's data is
    what counts (was: A's data record, compared in ``setup`` before B loaded, refused B's own data)."""
    ckpt_a, _ = data_checkpoint
    write_imagefolder(tmp_path / "bugs", classes=("ant", "bee", "fly"), train_per_class=4, eval_per_class=1,
                      eval_folder="test")
    bugs = datamodule(tmp_path / "bugs")
    L.seed_everything(0)
    trainer(tmp_path / "b", epochs=1).fit(module(num_classes=3, adapter_dir=str(tmp_path / "b_adapter")),
                                          datamodule=bugs)
    ckpt_b = next((tmp_path / "b" / "checkpoints").glob("*.ckpt"))
    loaded_a = FewShotClassifier.load_from_checkpoint(ckpt_a)
    assert trainer(tmp_path).test(loaded_a, datamodule=datamodule(tmp_path / "bugs"), ckpt_path=ckpt_b)
    with pytest.raises(ValueError, match=r"checkpoint was trained on classes \['ant', 'bee', 'fly'\]"):
        trainer(tmp_path).test(loaded_a, datamodule=datamodule(data_checkpoint[1]))  # it now holds B's weights


@pytest.mark.parametrize("stage", STAGES)
def test_a_module_fitted_in_this_process_is_refused_on_other_data_at_every_stage(data_checkpoint, tmp_path, stage):
    """Was: a fitted module tested on another folder's classes (same count) gave an accuracy under the wrong names."""
    _, pets = data_checkpoint
    write_imagefolder(tmp_path / "bugs", classes=("ant", "bee", "fly"), eval_per_class=1, eval_folder="test")
    fitted = module(num_classes=3, adapter_dir=str(tmp_path / "adapter"))
    trainer(tmp_path / "run", epochs=1, limit_train_batches=1).fit(fitted, datamodule=datamodule(pets))
    assert getattr(trainer(tmp_path), stage)(fitted, datamodule=datamodule(pets))  # its own data evaluates
    with pytest.raises(ValueError, match=r"this module's last fit was trained on classes \['cat', 'dog', 'owl'\]"):
        getattr(trainer(tmp_path), stage)(fitted, datamodule=datamodule(tmp_path / "bugs"))
    if stage == "validate":
        with pytest.raises(ValueError, match=r"another split than the run did .*--data.split_seed 1 \(fit: 0\)"):
            trainer(tmp_path).validate(fitted, datamodule=datamodule(pets, split_seed=1))


def test_a_loaded_checkpoint_fitted_on_other_data_is_then_evaluated_on_that_data(data_checkpoint, tmp_path):
    """A fit from loaded weights without ``ckpt_path`` is a new run: its data is what the weights now know."""
    ckpt, pets = data_checkpoint
    write_imagefolder(tmp_path / "bugs", classes=("ant", "bee", "fly"), train_per_class=4, eval_per_class=1,
                      eval_folder="test")
    loaded = FewShotClassifier.load_from_checkpoint(ckpt, adapter_dir=str(tmp_path / "adapter"))
    trainer(tmp_path / "run", epochs=1, limit_train_batches=1).fit(loaded, datamodule=datamodule(tmp_path / "bugs"))
    assert trainer(tmp_path).test(loaded, datamodule=datamodule(tmp_path / "bugs"))
    with pytest.raises(ValueError, match=r"this module's last fit was trained on classes \['ant', 'bee', 'fly'\]"):
        trainer(tmp_path).test(loaded, datamodule=datamodule(pets))


# ---- a resume keeps the run's trainer settings -----------------------------------------------------------------

@pytest.mark.parametrize("changed, shown", [
    (dict(accumulate_grad_batches=3), "trainer.accumulate_grad_batches 3 (checkpoint: 1)"),
    (dict(gradient_clip_val=0.001), "trainer.gradient_clip_val 0.001 (checkpoint: None)"),
    (dict(limit_train_batches=0.34), "trainer.limit_train_batches 0.34 (checkpoint: 1.0)"),
    (dict(limit_train_batches=1), "trainer.limit_train_batches 1 (checkpoint: 1.0)"),  # one batch, not all of them
    (dict(precision="bf16-mixed"), "trainer.precision 'bf16-mixed' (checkpoint: '32-true')"),
])
def test_resuming_with_other_trainer_settings_is_refused_naming_them(checkpoint, tmp_path, changed, shown):
    """Was: accepted, the rest of the run trained otherwise (one batch an epoch, bf16) and recorded as one run."""
    run = trainer(tmp_path, epochs=2, **changed)
    refused_before_a_step(run, lambda: run.fit(module(), loader(), ckpt_path=checkpoint), re.escape(shown))


def test_settings_of_the_same_value_are_the_same_but_a_batch_count_is_not_a_fraction():
    from nola_vision.train.module import check_training_settings
    check_training_settings({"gradient_clip_val": 1, "precision": "32-true"}, {"gradient_clip_val": 1.0,
                                                                              "precision": "32-true"})
    with pytest.raises(ValueError, match=r"limit_train_batches 1 \(checkpoint: 1.0\)"):
        check_training_settings({"limit_train_batches": 1.0}, {"limit_train_batches": 1})


def test_a_fit_trains_when_its_test_split_cannot_be_listed(tmp_path):
    """The test split's digest is recorded where it can be listed; a fit needs no test split (was: a test folder with
    an extra class stopped the fit before its first step)."""
    from PIL import Image

    write_imagefolder(tmp_path / "pets", train_per_class=4, eval_per_class=1, eval_folder="test")
    extra = tmp_path / "pets" / "test" / "zebra" / "z.png"
    extra.parent.mkdir(parents=True)
    Image.new("RGB", (20, 16), (1, 2, 3)).save(extra)
    run = trainer(tmp_path / "run", epochs=1, limit_train_batches=1)
    run.fit(module(num_classes=3, adapter_dir=str(tmp_path / "adapter")), datamodule=datamodule(tmp_path / "pets"))
    assert run.global_step == 1


def test_max_steps_that_end_the_fit_before_max_epochs_warn_that_the_schedule_stops_partway(tmp_path):
    # 6 steps of a 50-epoch schedule: the learning rate stopped partway up its warm-up, with no word
    run = trainer(tmp_path, epochs=50, max_steps=6)
    with pytest.warns(UserWarning, match=r"max_steps=6 ends the fit in epoch 2 of max_epochs=50 \(4 steps per epoch\).*"
                                         r"Set trainer.max_epochs=2 instead of max_steps"):
        run.fit(module(), loader())
    assert run.global_step == 6


@pytest.mark.parametrize("search", ["lr_find", "scale_batch_size"])
def test_the_tuners_searches_of_a_few_steps_do_not_warn_that_max_steps_ends_the_schedule(tmp_path, search):
    # each search trains a few steps of its own under max_steps, inside its callback's on_fit_start: the warning
    # for a fit whose max_steps end it early fired on every lr_find, where the user had set no max_steps
    from lightning.pytorch.tuner import Tuner

    class Batches(L.LightningDataModule):  # the batch size finder sizes a data module's batches
        batch_size = 8

        def train_dataloader(self):
            return DataLoader(loader().dataset, batch_size=self.batch_size)

        def val_dataloader(self):
            return DataLoader(loader().dataset, batch_size=self.batch_size)

    run = trainer(tmp_path, epochs=50)
    options = dict(num_training=6, early_stop_threshold=None) if search == "lr_find" else dict(
        mode="power", steps_per_trial=6, max_trials=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        getattr(Tuner(run), search)(module(), datamodule=Batches(), **options)
    assert not [w for w in caught if "max_steps" in str(w.message) and "nola_vision" in str(w.message)]


def test_the_loggers_hyperparameters_are_the_checked_values_without_pickled_classes(tmp_path):
    # hparams.yaml held lr: null (the recipe's rates resolved later) and a !!python/object NOLAConfig that
    # yaml.safe_load and load_from_checkpoint(hparams_file=...) refused
    run = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, default_root_dir=tmp_path, enable_progress_bar=False,
                    enable_model_summary=False, logger=L.pytorch.loggers.CSVLogger(tmp_path))
    run.fit(module(lr=None, head_lr=None), loader())
    logged = yaml.safe_load(next(tmp_path.rglob("hparams.yaml")).read_text())
    assert logged["lr"] == nv.get_method("nola").default_lr and logged["head_lr"] is not None
    assert logged["adapter"]["class_path"] == "nola_vision.NOLAConfig"


def test_a_module_frozen_whole_is_refused_by_name_before_training(tmp_path):
    # freeze() (after using the module for inference) then fit: torch's bare "empty parameter list"
    frozen = module()
    frozen.freeze()
    run = trainer(tmp_path)
    refused_before_a_step(run, lambda: run.fit(frozen, loader()), r"parameter\(s\) that 'nola' trains are frozen")


@pytest.mark.parametrize("momentum", [1.0, 5.0])
def test_a_momentum_of_1_or_more_is_refused(momentum):
    with pytest.raises(ValueError, match="momentum"):
        module(optimizer="sgd", momentum=momentum)


def test_a_checkpoint_of_another_depth_names_the_tensors_that_differ(checkpoint):
    # the message listed the first four names of both sides, which were the same blocks.0 tensors
    with pytest.raises(ValueError, match=r"only in the checkpoint \[\], \d+ only in this model \['model.blocks.2"):
        FewShotClassifier.load_from_checkpoint(checkpoint, backbone_kwargs={**TINY["backbone_kwargs"], "depth": 3})


# ---- Lightning's tuner, and data-module settings set by hand -----------------------------------------------------

def digits(**kwargs) -> FewShotDataModule:
    return FewShotDataModule("digits", **{"shots": 2, "batch_size": 2, "backbone": TINY["backbone"], "image_size": 32,
                                          "augment": "none", **kwargs})


def test_lightnings_batch_size_finder_restores_its_own_checkpoint_and_the_fit_trains_on(tmp_path):
    # its restore was taken for a resume at another batch size and refused, and the trainer could not fit after
    from lightning.pytorch.tuner import Tuner

    data, model, run = digits(), module(num_classes=10), trainer(tmp_path, epochs=1)
    found = Tuner(run).scale_batch_size(model, datamodule=data, steps_per_trial=1, init_val=2, max_trials=2)
    assert found > 2 and data.batch_size == data.hparams.batch_size == found
    run.fit(model, datamodule=data)
    assert run.global_step == 20 // found and not list(tmp_path.glob(".scale_batch_size_*"))
    import pickle

    pickle.dumps(data)  # it holds the trainer, whose scheduler held a closure of the learning-rate recipe


def test_a_data_modules_split_settings_are_fixed_and_its_loader_settings_recorded():
    data = digits()
    for name, value in (("shots", 10), ("split_seed", 3), ("augment", "paper"), ("root", "elsewhere")):
        with pytest.raises(AttributeError, match=rf"FewShotDataModule.{name} is fixed when the module is made .*"
                                                 rf"create FewShotDataModule\(\.\.\., {name}="):
            setattr(data, name, value)  # trained on (or ignored after setup) while hparams kept the old value
    data.batch_size = 8
    assert data.hparams.batch_size == 8  # what checkpoints record and resumes compare
    with pytest.raises(ValueError, match="FewShotDataModule.batch_size must be"):
        data.batch_size = 0


def test_a_loader_with_labels_beyond_the_head_is_named_not_a_bare_index_error(tmp_path):
    run = trainer(tmp_path, epochs=1)
    with pytest.raises(ValueError, match=r"a training batch holds label 4, which is not one of the head's 4 classes "
                                         r"\(0..3\): there is no output to train for it.*FewShotDataModule"):
        run.fit(module(), loader(classes=10))  # was IndexError: Target 6 is out of bounds
    assert run.global_step == 0


def _labelled(labels, images=None):
    images = torch.randn(len(labels), 3, 32, 32) if images is None else images
    return DataLoader(TensorDataset(images, torch.tensor(labels)), batch_size=len(labels))


@pytest.mark.parametrize("labels, shown", [([0, 1, 5, 2], "5"), ([0, -1, 2, 3], "-1"), ([-100, 0, 1, 2], "-100")])
def test_evaluating_labels_the_head_has_no_class_for_is_refused_not_counted_as_wrong_answers(tmp_path, labels, shown):
    """Validation and test scored such images as wrong (an accuracy silently too low); a training batch of -100, the
    loss's ignore_index, trained on without them, or (all of them) was blamed on the learning rate."""
    run = trainer(tmp_path, epochs=1)
    for stage, evaluate in (("test", run.test), ("validation", run.validate)):
        with pytest.raises(ValueError, match=rf"a {stage} batch holds label {shown}, which is not one of the head's 4 "
                                             r"classes \(0..3\): the accuracy would count those images as wrong"):
            evaluate(module(), _labelled(labels), verbose=False)
    with pytest.raises(ValueError, match=rf"a training batch holds label {shown}"):
        run.fit(module(), _labelled(labels))
    assert run.global_step == 0


def test_integer_images_or_float_labels_are_named_not_a_dtype_error_deep_in_torch(tmp_path):
    run = trainer(tmp_path, epochs=1)
    images = (torch.rand(4, 3, 32, 32) * 255).to(torch.uint8)
    with pytest.raises(TypeError, match=r"a test batch holds uint8 images: the model takes floating-point images"):
        run.test(module(), _labelled([0, 1, 2, 3], images), verbose=False)
    with pytest.raises(TypeError, match=r"a training batch holds float32 labels: give class indices as integers"):
        run.fit(module(), DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0.0, 1, 2, 3]))))


def test_numpys_int32_labels_and_float64_images_train_as_int64_and_float32_do(tmp_path):
    """Straight from numpy, int32 labels failed in the loss ('expected target dtype to be Long') and float64 images in
    the patch embedding ('Input type (double) and bias type (float)'), though the batch check passed them."""
    images, labels = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    trained = []
    for batch in ((images, labels), (images.float(), labels.long())):
        torch.manual_seed(0)
        model = module()
        trainer(tmp_path / str(len(trained)), epochs=1).fit(model, DataLoader(TensorDataset(*batch), batch_size=4))
        trained.append({k: v for k, v in model.state_dict().items() if "nola_" in k or "head" in k})
    assert all(torch.equal(trained[0][key], trained[1][key]) for key in trained[1])


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_a_momentum_given_to_an_optimizer_without_one_warns_that_it_is_ignored(optimizer):
    with pytest.warns(UserWarning, match=rf"momentum=0.5 is SGD's, and optimizer='{optimizer}' ignores it"):
        module(optimizer=optimizer, momentum=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(optimizer=optimizer)  # the default momentum says nothing
        model = module(optimizer="sgd", momentum=0.5)
    model.trainer = L.Trainer(max_epochs=3, logger=False)
    assert model.configure_optimizers()["optimizer"].defaults["momentum"] == 0.5


def test_float64_images_alone_predict_as_float32_ones_do(tmp_path):
    # a prediction batch of images alone (TensorDataset(images)) was not converted, and failed in the patch embedding
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    model = module()
    outputs = [trainer(tmp_path / str(i), epochs=1).predict(model, DataLoader(TensorDataset(x), batch_size=4))
               for i, x in enumerate((images, images.float()))]
    assert torch.equal(outputs[0][0]["prediction"], outputs[1][0]["prediction"])


def test_a_block_wrapped_inside_the_model_is_refused_before_the_first_step_not_at_the_export(tmp_path):
    # save_adapter refused it at the fit's end, after the whole run
    model = module()
    model.model.blocks[0] = torch.compile(model.model.blocks[0], backend="eager")
    run = trainer(tmp_path, epochs=1)
    refused_before_a_step(run, lambda: run.fit(model, loader()),
                          r"FewShotClassifier fit \(it ends exporting with nv.save_adapter\): blocks.0 is wrapped by "
                          "torch.compile")


# ---- hyper-parameters set on a built module, and a trainer reused ----------------------------------------------

def test_label_smoothing_and_warmup_set_on_hparams_after_construction_are_what_the_fit_trains_and_records(tmp_path):
    # were ignored: the loss kept the constructor's smoothing (checkpoints recorded the new one) and the warm-up the
    # recipe's (overwritten in hparams); only lr, head_lr, weight_decay, ... were read again
    model = module(warmup_epochs=None, label_smoothing=0.1)
    model.hparams.label_smoothing, model.hparams.warmup_epochs = 0.0, 2
    run = trainer(tmp_path, epochs=4)
    rates = []
    run.fit(model, loader())
    assert model.criterion.label_smoothing == 0.0
    saved = torch.load(next((tmp_path / "checkpoints").glob("*.ckpt")), weights_only=False)["hyper_parameters"]
    assert (saved["label_smoothing"], saved["warmup_epochs"]) == (0.0, 2)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    for _ in range(3):
        rates.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step(), scheduler.step()
    assert rates[:2] == pytest.approx([1e-2 / 3, 2e-2 / 3])  # a 2-epoch warm-up
    del optimizer
    model.hparams.label_smoothing = 1.5
    with pytest.raises(ValueError, match=r"hparams.label_smoothing must be a finite number >= 0 and < 1"):
        trainer(tmp_path / "bad", epochs=1).fit(model, loader())


@pytest.mark.parametrize("name, value, refusal", [
    ("head_lr", -0.05, r"hparams.head_lr must be a finite number > 0"),  # trained the head by gradient ascent
    ("min_lr", -0.03, r"hparams.min_lr must be a finite number >= 0"),  # the last epoch at a negative rate
    ("min_lr", "1e-6", r"hparams.min_lr must be a finite number"),  # a bare TypeError
    ("momentum", 5.0, r"hparams.momentum must be a finite number >= 0 and < 1"),  # trained; its checkpoint refused
    ("weight_decay", -1.0, r"hparams.weight_decay must be a finite number >= 0"),
])
def test_optimiser_settings_set_on_hparams_after_construction_are_checked_before_the_fit(tmp_path, name, value,
                                                                                         refusal):
    model = module(optimizer="sgd")
    setattr(model.hparams, name, value)
    run = trainer(tmp_path, epochs=1)
    refused_before_a_step(run, lambda: run.fit(model, loader()), refusal)


def test_head_lr_set_to_none_after_construction_is_the_recipes_rate_as_at_construction(tmp_path):
    model = module()
    recipe = module(head_lr=None).hparams.head_lr / module(head_lr=None).hparams.lr
    model.hparams.lr, model.hparams.head_lr = 3e-3, None
    model.trainer = L.Trainer(max_epochs=1, logger=False)
    model.configure_optimizers()
    assert model.hparams.head_lr == pytest.approx(3e-3 * recipe)


def test_a_second_fit_on_a_trainer_that_reached_max_epochs_is_refused_before_exporting_again(tmp_path):
    # trained nothing and exported the same adapter again as that fit's result (the first moved to .previous)
    model = module(adapter_dir=str(tmp_path / "adapter"))
    run = trainer(tmp_path, epochs=1)
    run.fit(model, loader())
    with pytest.raises(ValueError, match=r"this Trainer's earlier fit trained 1 epochs \(4 steps\), and its "
                                         r"max_epochs=1 ends the run there: .*Fit with a new Trainer, or raise its "
                                         r"max_epochs above 1"):
        run.fit(model, loader())
    assert run.global_step == 4
    assert not (tmp_path / "adapter.previous").exists()
    run.fit_loop.max_epochs = 2  # raised: it trains on
    run.fit(model, loader())
    assert run.global_step == 8


def test_a_checkpoint_saved_after_an_epochs_first_batch_is_refused_as_inside_the_epoch(tmp_path):
    # every_n_train_steps=1's step-1 checkpoint records the batch as processed, not completed: the resume trained the
    # epoch's first batch twice and never its last, without a word
    from lightning.pytorch.callbacks import ModelCheckpoint

    every = ModelCheckpoint(dirpath=tmp_path / "every", every_n_train_steps=1, save_top_k=-1)
    trainer(tmp_path, epochs=1, callbacks=[every]).fit(module(), loader())
    run = trainer(tmp_path / "resumed", epochs=2)
    with pytest.raises(ValueError, match=r"saved after step 1, 1 batches into epoch 0"):
        run.fit(module(), loader(), ckpt_path=tmp_path / "every" / "epoch=0-step=1.ckpt")
    assert run.global_step == 0


@pytest.mark.parametrize("world", [1, 2])
def test_each_ddp_process_of_a_fresh_fit_draws_from_random_streams_of_its_own(world):
    # every rank was seeded alike: with images of one size each drew the same crops, flips and dropout masks
    import random
    from types import SimpleNamespace

    from nola_vision.train.module import _draw_apart

    draws = []
    for rank in range(world):
        torch.manual_seed(0)
        random.seed(0)
        _draw_apart(SimpleNamespace(world_size=world, global_rank=rank))
        draws.append((torch.rand(4).tolist(), random.random()))
    torch.manual_seed(0)
    random.seed(0)
    alone = (torch.rand(4).tolist(), random.random())
    assert (draws[0] == alone) == (world == 1)  # one process keeps its seeded streams
    assert len({repr(d) for d in draws}) == world


# ---- a notebook's cells run again: the module remembers what its fits did ------------------------------------------

class _StopAtStep(L.Callback):
    """Raises ``error`` once at the given step, as a Jupyter interrupt or a failing cell does."""

    def __init__(self, step: int, error: type = RuntimeError) -> None:
        self.step, self.error, self.done = step, error, False

    def on_train_batch_end(self, trainer, *args):
        if not self.done and trainer.global_step >= self.step:
            self.done = True
            raise self.error("stopped")


def test_a_trainers_fit_going_on_with_another_split_is_refused(tmp_path, folder_root):
    """The same trainer fit on with a datamodule of another split trained on, and its checkpoints recorded only the
    new split (a validation image of it was a training image of the first)."""
    (folder_root / "val").mkdir(exist_ok=True)
    run, fitted = trainer(tmp_path, epochs=3, callbacks=[_StopAtStep(2)]), module(num_classes=3)
    with pytest.raises(RuntimeError, match="stopped"):
        run.fit(fitted, datamodule=datamodule(folder_root))
    with pytest.raises(ValueError, match=r"another split than the run did .*split_seed 1 \(fit: 0\)"):
        run.fit(fitted, datamodule=datamodule(folder_root, split_seed=1))


class _UnfreezeABlock(L.pytorch.callbacks.BaseFinetuning):
    """A user's finetuning callback: a backbone block trains from epoch 1."""

    def freeze_before_training(self, pl_module):
        pass

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.model.blocks[1].attn, optimizer)


@pytest.mark.parametrize("callback, said", [
    (lambda: L.pytorch.callbacks.StochasticWeightAveraging(swa_lrs=0.01),
     "StochasticWeightAveraging swaps its averaged weights in when training ends.*Use lightning.pytorch.callbacks."
     "WeightAveraging"),
    (lambda: L.pytorch.callbacks.ModelPruning("l1_unstructured", amount=0.5),
     "ModelPruning prunes the model's weights as it trains, the frozen backbone's too"),
    (lambda: _UnfreezeABlock(), r"_UnfreezeABlock \(a BaseFinetuning callback\) freezes and unfreezes modules")],
    ids=["swa", "pruning", "finetuning"])
def test_callbacks_that_change_weights_where_the_export_cannot_follow_are_refused_before_training(tmp_path, callback,
                                                                                                 said):
    """SWA swapped its average in after the last validation and checkpoint (the result mixed two sets of weights);
    ModelPruning pruned the frozen backbone, and the adapter loaded onto no backbone its config builds; a
    BaseFinetuning callback trained backbone blocks the file cannot hold (BackboneFinetuning: an AttributeError)."""
    fitted = module()
    before = {name: p.detach().clone() for name, p in fitted.named_parameters()}
    with pytest.raises(ValueError, match=said):
        trainer(tmp_path, epochs=2, callbacks=[callback()]).fit(fitted, loader())
    assert all(torch.equal(p, before[name]) for name, p in fitted.named_parameters())
    trainer(tmp_path / "averaged", epochs=2, callbacks=[L.pytorch.callbacks.WeightAveraging()]).fit(fitted, loader())


def test_a_resume_with_a_finder_callback_is_refused_before_it_searches_again(tmp_path, checkpoint):
    """The finder searched again on the part-trained weights: the rest of the run trained at another rate, recorded
    as the whole run's (BatchSizeFinder's restore of its own checkpoint also restarted the epochs)."""
    finder = partial(L.pytorch.callbacks.LearningRateFinder, num_training_steps=5)
    resumed = module()
    with pytest.raises(ValueError, match=r"LearningRateFinder searches again when a fit resumes from a checkpoint.*"
                                         r"Resume without the callback"):
        trainer(tmp_path, epochs=2, callbacks=[finder()]).fit(resumed, loader(), ckpt_path=checkpoint)
    assert resumed.trainer.global_step == 0  # refused before a step
    trainer(tmp_path / "fresh", epochs=1, callbacks=[finder()]).fit(module(), loader())  # a fresh fit searches


class _FailAtEpochStart(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("failed as epoch 1 began")


def test_a_resume_from_a_checkpoint_saved_as_an_epoch_began_is_refused(tmp_path):
    # OnExceptionCheckpoint kept the state of an epoch made ready, none of its batches started: the resume went past
    # that epoch, which never trained, and exported the adapter as a finished run's
    kept = L.pytorch.callbacks.OnExceptionCheckpoint(dirpath=tmp_path / "kept")
    with pytest.raises(RuntimeError, match="failed as epoch 1 began"):
        trainer(tmp_path / "a", epochs=2, callbacks=[kept, _FailAtEpochStart()]).fit(module(), loader())
    resumed = module()
    with pytest.raises(ValueError, match=r"saved as epoch 1 began, before its first batch .* it would never train"):
        trainer(tmp_path / "b", epochs=2).fit(resumed, loader(), ckpt_path=tmp_path / "kept" / "on_exception.ckpt")
    assert resumed.exported_adapter_dir is None


def test_fitting_merged_adapters_is_refused_before_the_fit_marks_the_weights_part_trained(tmp_path):
    """A fit after nv.merge failed at its first backward, having marked the trained weights as a stopped fit's (every
    later evaluation warned) and dropped the adapter the module had exported."""
    fitted = module(adapter_dir=str(tmp_path / "adapter"))
    trainer(tmp_path / "a", epochs=1).fit(fitted, loader())
    nv.merge(fitted.model)
    with pytest.raises(ValueError, match=r"\d+ adapted layer\(s\) of the model are merged .*e.g. model.blocks.0.*"
                                         r"call nv.unmerge\(module.model\) before fitting"):
        trainer(tmp_path / "b", epochs=1).fit(fitted, loader())
    assert fitted.exported_adapter_dir == tmp_path / "adapter"
    nv.unmerge(fitted.model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*stopped before it finished")
        trainer(tmp_path / "c").validate(fitted, loader())


def test_a_module_whose_fit_stopped_warns_at_its_next_fit_and_evaluation(tmp_path):
    """A re-run cell trained on from the part-trained weights as a fresh run, and a test of them was logged as a
    trained run's, without a word."""
    fitted = module(adapter_dir=str(tmp_path / "adapter"))
    with pytest.raises(RuntimeError, match="stopped"):
        trainer(tmp_path / "a", epochs=2, callbacks=[_StopAtStep(2)]).fit(fitted, loader())
    assert fitted.exported_adapter_dir is None
    with pytest.warns(UserWarning, match="weights of a fit that stopped before it finished"):
        trainer(tmp_path / "b").validate(fitted, loader())
    with pytest.warns(UserWarning, match="previous fit stopped before it finished"):
        trainer(tmp_path / "c", epochs=1).fit(fitted, loader())
    with warnings.catch_warnings():  # finished now
        warnings.filterwarnings("error", message=".*stopped before it finished")
        trainer(tmp_path / "d").validate(fitted, loader())


@pytest.mark.parametrize("key, value", [("adapter", {"class_path": "nola_vision.NOLAConfig", "init_args": {"rank": 8}}),
                                        ("backbone_seed", 5), ("num_classes", 12)])
def test_hparams_that_built_the_model_set_between_fits_are_refused(tmp_path, key, value):
    """The fit trained the model as built while its checkpoints recorded the new values, so none of them loaded."""
    fitted = module(adapter_dir=str(tmp_path / "adapter"))
    trainer(tmp_path / "a", epochs=1).fit(fitted, loader())
    fitted.hparams[key] = value
    run = trainer(tmp_path / "b", epochs=1)
    refused_before_a_step(run, lambda: run.fit(fitted, loader()),
                          rf"hparams changed after the model was built from them \({key}: ")


def test_a_debug_fit_leaves_no_earlier_fits_adapter_named_as_its_own(tmp_path):
    fitted = module(adapter_dir=str(tmp_path / "adapter"))
    trainer(tmp_path / "a", epochs=1).fit(fitted, loader())
    assert fitted.exported_adapter_dir is not None
    L.Trainer(accelerator="cpu", fast_dev_run=True, logger=False, enable_progress_bar=False,
              default_root_dir=tmp_path / "b").fit(fitted, loader())
    assert fitted.exported_adapter_dir is None and fitted.exported_adapter_sha256 is None


def test_a_checkpoint_cut_short_is_named_by_load_from_checkpoint(checkpoint, tmp_path):
    # a bare "OSError: [Errno 22] Invalid argument" from inside torch.load, naming no file
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(checkpoint.read_bytes()[:2000])
    with pytest.raises(ValueError, match=rf"{re.escape(str(cut))} is not a checkpoint written by fit .* cut short"):
        FewShotClassifier.load_from_checkpoint(cut)
    assert FewShotClassifier.load_from_checkpoint(checkpoint).hparams.num_classes == 4


@pytest.mark.parametrize("stage", ["fit", "validate"])
def test_a_checkpoint_cut_short_is_named_when_a_trainer_of_ones_own_loads_it(checkpoint, tmp_path, stage):
    # Trainer.fit(ckpt_path=...) from Python loaded it with Lightning's default writer: a bare "[Errno 22]"
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    whole = folder / "epoch=0-step=2.ckpt"
    whole.write_bytes(checkpoint.read_bytes())
    cut = folder / "last.ckpt"
    cut.write_bytes(checkpoint.read_bytes()[:2000])
    run = trainer(tmp_path / "run", epochs=2)
    named = rf"the newest whole one beside it: ckpt_path='{re.escape(str(whole))}'"
    with pytest.raises(ValueError, match=rf"ckpt_path {re.escape(str(cut))} is not a checkpoint written by fit .* "
                                         rf"cut short.*{named}"):
        getattr(run, stage)(module(), loader(), ckpt_path=cut)
    assert type(run.strategy.checkpoint_io).__name__ == "LocalAtomicCheckpointIO"


def test_a_checkpoint_in_torchs_format_before_zip_archives_is_not_taken_for_one_cut_short(checkpoint, tmp_path):
    legacy = tmp_path / "legacy.ckpt"
    torch.save(torch.load(checkpoint, weights_only=False), legacy, _use_new_zipfile_serialization=False)
    run = trainer(tmp_path / "run", epochs=1)
    run.validate(module(), loader(), ckpt_path=legacy)  # loaded by torch as before


def test_a_resumed_run_replaces_a_last_ckpt_linked_to_the_best_checkpoint_and_keeps_the_best(tmp_path):
    """save_last="link" links last.ckpt to the best checkpoint; the resumed run's next save wrote through the link, so
    the best checkpoint (still best_model_path) silently held the last epoch's weights and the best was gone."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(epochs, ckpt_path=None):
        L.seed_everything(0)
        keep = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="epoch", mode="min", save_top_k=1, save_last="link",
                               enable_version_counter=False)
        trainer(tmp_path / "run", epochs=epochs, callbacks=[keep]).fit(module(), loader(), ckpt_path=ckpt_path)
        return Path(keep.best_model_path)

    best = run(1)
    last = tmp_path / "ckpts" / "last.ckpt"
    assert last.is_symlink() and last.resolve() == best.resolve()
    before = best.read_bytes()
    assert run(3, ckpt_path=last) == best and best.read_bytes() == before  # epoch 0 is still the best
    assert not last.is_symlink() and torch.load(last, weights_only=False)["epoch"] == 3


def test_a_checkpoint_plugin_of_ones_own_is_kept(tmp_path):
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class Mine(TorchCheckpointIO):
        pass

    run = trainer(tmp_path / "run", epochs=1, plugins=[Mine()])
    run.fit(module(), loader())
    assert type(run.strategy.checkpoint_io) is Mine and any((tmp_path / "run").rglob("*.ckpt"))


def test_a_callable_in_backbone_kwargs_is_no_change_of_the_built_hparams(tmp_path):
    # a functools.partial equals no copy of itself: every fit of such a model was refused as changed
    import functools

    kwargs = {**TINY["backbone_kwargs"], "norm_layer": functools.partial(torch.nn.LayerNorm, eps=1e-6)}
    fitted = module(adapter_dir=str(tmp_path / "adapter"), backbone_kwargs=kwargs)
    trainer(tmp_path / "a", epochs=1).fit(fitted, loader())
    fitted.hparams.backbone_kwargs["depth"] = 3  # changed in place: still seen
    run = trainer(tmp_path / "b", epochs=1)
    refused_before_a_step(run, lambda: run.fit(fitted, loader()), r"\(backbone_kwargs: ")


def test_a_refused_fit_leaves_the_module_as_its_last_fit_left_it(tmp_path, checkpoint):
    fitted = module(adapter_dir=str(tmp_path / "adapter"))
    trainer(tmp_path / "a", epochs=1).fit(fitted, loader())
    exported = fitted.exported_adapter_dir
    (tmp_path / "a_file").write_text("x")
    fitted.hparams.adapter_dir = str(tmp_path / "a_file")  # refused as the fit starts
    run = trainer(tmp_path / "b", epochs=1)
    refused_before_a_step(run, lambda: run.fit(fitted, loader()), "a_file")
    fitted.hparams.adapter_dir = str(tmp_path / "adapter")
    assert fitted.exported_adapter_dir == exported
    with warnings.catch_warnings():  # neither part-trained nor a checkpoint's weights evaluated after a stopped fit
        warnings.filterwarnings("error", message=".*stopped before it finished")
        trainer(tmp_path / "c").validate(fitted, loader())
        stopped = module(adapter_dir=str(tmp_path / "stopped"))
        with pytest.raises(RuntimeError, match="stopped"):
            trainer(tmp_path / "d", epochs=2, callbacks=[_StopAtStep(2)]).fit(stopped, loader())
        trainer(tmp_path / "e").validate(stopped, loader(), ckpt_path=checkpoint)


def test_built_hparams_shown_alike_in_another_process_are_no_change():
    # a functools.partial of a function: ddp_spawn's copy showed another address, and every rank refused the fit
    import functools

    from nola_vision.train.module import _shown

    def made():  # the same function, as another process's copy of it (at another address)
        namespace = {}
        exec("def make_norm(dim, eps=1e-6):\n    return dim", namespace)
        return {"norm_layer": functools.partial(namespace["make_norm"], eps=1e-5)}

    first, second = made(), made()
    assert repr(first) != repr(second) and _shown(first) == _shown(second)


class ClassNamesFailing(L.LightningDataModule):
    """A custom datamodule whose ``class_names`` raises after ``failing_after`` reads."""

    def __init__(self, failing_after: int = 0) -> None:
        super().__init__()
        self.reads = failing_after

    @property
    def class_names(self):
        self.reads -= 1
        if self.reads < 0:
            raise OSError("metadata.json is corrupt")
        return ["a", "b", "c", "d"]

    def train_dataloader(self):
        return loader()


def test_a_custom_datamodule_whose_class_names_raise_fails_the_fit_before_a_step_with_its_error(tmp_path):
    """The class-count check swallowed the error (the head went unchecked), while the data record raised it."""
    run = trainer(tmp_path, epochs=1, limit_train_batches=1)
    with pytest.raises(OSError, match="metadata.json is corrupt"):
        run.fit(module(), datamodule=ClassNamesFailing())
    assert run.global_step == 0


def test_class_names_that_fail_only_at_the_export_leave_the_adapter_saved_without_them_with_a_warning(tmp_path):
    run = trainer(tmp_path, epochs=1, limit_train_batches=1)
    data = ClassNamesFailing(failing_after=10**6)
    fitted = module(adapter_dir=str(tmp_path / "adapter"))
    fitted.on_train_end = lambda: setattr(data, "reads", 0)  # fails from the end of training on
    with pytest.warns(UserWarning, match="ClassNamesFailing.class_names raised OSError: metadata.json is corrupt; "
                                         "the adapter is saved without class names"):
        run.fit(fitted, datamodule=data)
    assert nv.verify_adapter(module().model, tmp_path / "adapter").class_names is None
