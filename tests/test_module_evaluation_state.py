"""From Python, a trainer evaluating a checkpoint leaves the next fit alone (the data module takes up a checkpoint's
shuffle and random states for a resume only), each checkpoint records the frozen backbone its fit trained on, and a
trainer fitting on after raising max_epochs takes the learning-rate schedule up where it stood, with a warning."""
import json
import random
import re

import lightning as L
import pytest
import torch
from fixtures_data import write_imagefolder
from lightning.pytorch.callbacks import ModelCheckpoint
from test_module import NOLA, TINY, loader, trainer

from nola_vision.data import FewShotDataModule
from nola_vision.train.module import FewShotClassifier


def module() -> FewShotClassifier:
    return FewShotClassifier(num_classes=3, adapter=NOLA, lr=1e-2, head_lr=1e-2, warmup_epochs=0, **TINY)


def coefficients(model: FewShotClassifier) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


def fit(root, datamodule, name: str) -> FewShotClassifier:
    L.seed_everything(0)
    model = module()
    trainer(root / name, epochs=1).fit(model, datamodule=datamodule)
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_imagefolder(root / "pets", train_per_class=4, eval_per_class=1, eval_folder="test")
    return root / "pets"


def datamodule(folder) -> FewShotDataModule:
    return FewShotDataModule("imagefolder", root=str(folder), shots=4, batch_size=4, image_size=32,
                             backbone="vit_tiny_patch16_224")


@pytest.mark.parametrize("stage", ["test", "validate", "predict"])
def test_evaluating_a_checkpoint_changes_neither_the_next_fresh_fit_nor_the_random_state(folder, tmp_path, stage):
    shared = datamodule(folder)
    first = fit(tmp_path, shared, "first")
    checkpoint = next((tmp_path / "first" / "checkpoints").glob("*.ckpt"))
    random.seed(123)
    expected_draw = random.random()
    random.seed(123)
    getattr(trainer(tmp_path / "eval"), stage)(module(), datamodule=shared, ckpt_path=checkpoint)
    assert random.random() == expected_draw  # the user's Python random state is theirs
    again = fit(tmp_path, shared, "again")  # a new run on the same data module: its own seed's orders
    torch.testing.assert_close(coefficients(again), coefficients(first), rtol=0, atol=0)


def test_a_checkpoint_records_the_backbone_its_fit_trained_on_after_the_weights_changed(folder, tmp_path):
    shared = datamodule(folder)
    model = fit(tmp_path, shared, "first")
    first = next((tmp_path / "first" / "checkpoints").glob("*.ckpt"))
    FewShotClassifier.load_from_checkpoint(first)  # built as the run was: its backbone
    other = {name: torch.randn_like(p) for name, p in model.model.named_parameters() if not p.requires_grad}
    model.model.load_state_dict(other, strict=False)  # another backbone's frozen weights, loaded between two fits
    trainer(tmp_path / "second", epochs=1).fit(model, datamodule=shared)
    second = next((tmp_path / "second" / "checkpoints").glob("*.ckpt"))
    with pytest.raises(ValueError, match="different frozen backbone"):  # it trained on the other weights
        FewShotClassifier.load_from_checkpoint(second)


class _Rates(L.Callback):
    def __init__(self):
        self.rates = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


class _StopAtStep(L.Callback):
    """Ctrl-C in a notebook at the given step of the first epoch (Lightning stops the fit on it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_a_fit_stopped_inside_its_first_epoch_and_fitted_again_on_the_same_trainer_says_so(tmp_path):
    # it trained epoch 0 again from the stopped run's weights with a fresh Adam, and exported that without a word
    L.seed_everything(0)
    data = loader(classes=3)
    run = trainer(tmp_path, epochs=2, callbacks=[_StopAtStep(1)], enable_checkpointing=False)
    model = module()
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run.fit(model, data)
    run.callbacks = [c for c in run.callbacks if not isinstance(c, _StopAtStep)]
    with pytest.warns(UserWarning, match=r"took 1 step of epoch 0 in a fit that stopped.*epoch 0 is trained again "
                                         r"in full.*Build a new model and Trainer"):
        run.fit(model, data)


def test_a_new_module_on_a_trainer_stopped_inside_another_modules_fit_is_refused(tmp_path):
    """A notebook's model cell run again after Ctrl-C: the new module trained only the epochs the stopped run had left,
    without its warm-up, warned as "this fit goes on", and its lr and split were never compared."""
    data = loader(classes=3)
    run = trainer(tmp_path, epochs=3, callbacks=[_StopAtStep(6)], enable_checkpointing=False)  # 4 steps an epoch
    stopped = module()
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run.fit(stopped, data)
    run.callbacks = [c for c in run.callbacks if not isinstance(c, _StopAtStep)]
    fresh = module()
    before = coefficients(fresh)
    with pytest.raises(ValueError, match=r"this Trainer stopped partway through the fit of another module \(at epoch "
                                         r"1, step 6\).*would train only the epochs that run had left of "
                                         r"max_epochs=3, without its warm-up. Fit it with a new Trainer"):
        run.fit(fresh, data)
    assert torch.equal(coefficients(fresh), before) and not fresh._fit_running
    with pytest.warns(UserWarning, match="goes on at epoch 1 of a trainer that trained before"):
        run.fit(stopped, data)  # the module that stopped goes on with its run
    trainer(tmp_path / "new", epochs=1, enable_checkpointing=False).fit(fresh, data)  # a new Trainer trains it


def test_fitting_on_with_a_raised_max_epochs_takes_the_schedule_up_where_it_stood(tmp_path):
    L.seed_everything(0)
    whole = _Rates()
    data = loader(classes=3)
    trainer(tmp_path / "whole", epochs=4, callbacks=[whole], enable_checkpointing=False).fit(module(), data)
    rates = _Rates()
    run = trainer(tmp_path / "parts", epochs=2, callbacks=[rates], enable_checkpointing=False)
    model = module()
    run.fit(model, data)
    run.fit_loop.max_epochs = 4
    with pytest.warns(UserWarning, match=r"goes on at epoch 2 of a trainer that trained before.*no checkpoint of the "
                                         r"run was saved: give the Trainer ModelCheckpoint\(save_last=True\)"):
        run.fit(model, data)
    # epochs 2 and 3 at the 4-epoch schedule's rates (epochs 0 and 1 ran a 2-epoch schedule); was lr0 again at epoch 2
    assert len(rates.rates) == 4 and rates.rates[2:] == pytest.approx(whole.rates[2:])


@pytest.mark.parametrize("change", [dict(lr=0.001), dict(optimizer="sgd"), dict(label_smoothing=0.0)],
                         ids=["lr", "optimizer", "label_smoothing"])
def test_going_on_with_a_trainers_run_under_other_training_settings_is_refused_as_a_resume_is(tmp_path, change):
    """A notebook's "lower the rate and carry on" on the same Trainer: its checkpoints then recorded the new rate for
    epochs trained at the old one (a resume through a checkpoint refused it)."""
    run = trainer(tmp_path, epochs=2, enable_checkpointing=False)
    model = FewShotClassifier(num_classes=3, adapter=NOLA, lr=1e-2, warmup_epochs=0, **TINY)  # head_lr follows lr
    run.fit(model, loader(classes=3))
    run.fit_loop.max_epochs = 3
    before = dict(model.hparams)
    model.hparams.update(change)
    key = next(iter(change))
    with pytest.raises(ValueError, match=rf"goes on with the run of a trainer that trained before, with other "
                                         rf"settings than that run's: {key}=.* \(the run: .*Set them back to go "
                                         rf"on") as refused:
        run.fit(model, loader(classes=3))
    assert "head_lr" not in str(refused.value)  # it followed lr, and follows it back
    model.hparams.update({key: before[key]})
    with pytest.warns(UserWarning, match="goes on at epoch 2 of a trainer that trained before"):
        run.fit(model, loader(classes=3))  # the run's own settings go on


@pytest.mark.parametrize("save_last", [None, True])
def test_fitting_on_without_a_checkpoint_names_the_one_to_resume_from(tmp_path, save_last):
    # said "pass ckpt_path='last'", which a plain Trainer (no last.ckpt) answered with "No checkpoint will be loaded"
    saving = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=save_last)
    run = trainer(tmp_path, epochs=2, callbacks=[saving])
    model = module()
    run.fit(model, loader(classes=3))
    run.fit_loop.max_epochs = 3
    advice = (r"pass ckpt_path='last' to resume the saved run" if save_last else
              rf"pass ckpt_path='{re.escape(str(tmp_path / 'checkpoints'))}/epoch=1-step=\d+.ckpt' \(the newest")
    with pytest.warns(UserWarning, match=rf"goes on at epoch 2 of a trainer that trained before.*{advice}"):
        run.fit(model, loader(classes=3))


def test_a_later_call_given_dataloaders_is_not_described_by_an_earlier_calls_data_module(folder, tmp_path):
    # Lightning keeps trainer.datamodule from an earlier call: a fit on the user's own loaders exported the data
    # module's class names and recorded its split, and a test of a 4-class model was refused as "10 classes"
    shared = datamodule(folder)
    first = fit(tmp_path, shared, "first")
    reused = trainer(tmp_path / "reused", epochs=1)
    reused.test(first, datamodule=shared, verbose=False)
    other = FewShotClassifier(num_classes=4, adapter=NOLA, adapter_dir=str(tmp_path / "adapter"), lr=1e-2,
                              head_lr=1e-2, warmup_epochs=0, **TINY)
    reused.fit(other, train_dataloaders=loader(classes=4))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()).get("class_names") is None
    saved = torch.load(next((tmp_path / "reused" / "checkpoints").glob("*.ckpt")), weights_only=False)
    assert saved["nola_vision"]["data"] is None and "datamodule_hyper_parameters" not in saved
    assert reused.test(other, dataloaders=loader(classes=4), verbose=False)  # its own 4 classes, not the data's 3
    assert reused.predict(other, dataloaders=loader(classes=4))
