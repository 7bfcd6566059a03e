"""FewShotClassifier: what it trains, what checkpoints hold, how bad configs fail, the schedule."""
import copy
import dataclasses
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from timm.layers import PatchEmbed
from torch.utils.data import DataLoader, TensorDataset

import nola_vision as nv
from nola_vision import LoRAConfig, NOLAConfig, load_adapter
from nola_vision.core.config import adapter_to_hparam, resolve_adapter
from nola_vision.train.checkpoint_io import nested_sha256
from nola_vision.train.module import FewShotClassifier
from nola_vision.train.recipe import cosine_factor

TINY = dict(backbone="vit_tiny_patch16_224", pretrained=False, image_size=32,
            backbone_kwargs=dict(patch_size=8, depth=2, embed_dim=64, num_heads=2))
NOLA = NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16)


def loader(n: int = 32, classes: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.arange(n) % classes
    return DataLoader(TensorDataset(x, y), batch_size=8)


def trainer(tmp_path: Path, epochs: int = 2, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, default_root_dir=tmp_path, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def test_checkpoint_holds_only_trained_tensors_and_reloads_identically(tmp_path):
    L.seed_everything(0)
    model = FewShotClassifier(num_classes=4, adapter=NOLA, adapter_dir=str(tmp_path / "adapter"), **TINY)
    t = trainer(tmp_path)
    t.fit(model, loader())
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    state = torch.load(ckpt, weights_only=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state["state_dict"]) == trained
    assert all("nola_alpha" in k or "nola_beta" in k or "head" in k for k in trained)
    assert ckpt.stat().st_size < 100_000
    assert state["nola_vision"]["parameter_counts"] == model.parameter_counts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = FewShotClassifier.load_from_checkpoint(ckpt)
    assert not [w for w in caught if "Found keys" in str(w.message)]  # frozen tensors come from the built model
    x = torch.randn(2, 3, 32, 32)
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("flags", ["freeze", "unfreeze"])
def test_a_checkpoint_saved_after_freeze_or_unfreeze_holds_the_trained_tensors(tmp_path, flags):
    """Lightning's freeze() before inference cleared every requires_grad, and the checkpoint kept the tensors that
    required grad: none (unfreeze(): the whole backbone), and it could not be loaded."""
    L.seed_everything(0)
    model = FewShotClassifier(num_classes=4, adapter=NOLA, adapter_dir=str(tmp_path / "adapter"), **TINY)
    t = trainer(tmp_path, epochs=1)
    t.fit(model, loader())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    getattr(model, flags)()
    t.save_checkpoint(tmp_path / "after.ckpt")
    state = torch.load(tmp_path / "after.ckpt", weights_only=False)
    assert set(state["state_dict"]) == trained == set(state["nola_vision"]["trained_keys"])
    restored = FewShotClassifier.load_from_checkpoint(tmp_path / "after.ckpt").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model.eval()(x), rtol=0, atol=0)


def test_a_checkpoint_of_a_compiled_inner_model_loads_onto_a_plain_one_and_back(tmp_path):
    """With ``self.model`` compiled, checkpoints kept torch.compile's ``_orig_mod.`` in every key and loaded only onto
    a module compiled the same way ("build the model with the checkpoint's config")."""
    L.seed_everything(0)
    model = FewShotClassifier(num_classes=4, adapter=NOLA, adapter_dir=str(tmp_path / "adapter"), **TINY)
    model.model = torch.compile(model.model, backend="eager")
    t = trainer(tmp_path, epochs=1)
    t.fit(model, loader())
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    state = torch.load(ckpt, weights_only=False)
    assert not [k for k in [*state["state_dict"], *state["nola_vision"]["trained_keys"]] if "_orig_mod" in k]
    plain = FewShotClassifier.load_from_checkpoint(ckpt).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model.eval()(x), rtol=1e-6, atol=1e-6)
    compiled = FewShotClassifier(num_classes=4, adapter=NOLA, adapter_dir=str(tmp_path / "again"), **TINY)
    compiled.model = torch.compile(compiled.model, backend="eager")
    t.test(compiled, loader(), ckpt_path=ckpt, verbose=False)  # and back onto a compiled one
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), plain(x), rtol=1e-6, atol=1e-6)


def _plain_tiny():
    from nola_vision.models.backbones import build_backbone

    return build_backbone(TINY["backbone"], 4, pretrained=False, image_size=32, backbone_seed=0,
                          **TINY["backbone_kwargs"])


class _PatchEmbedWithBatchNorm(PatchEmbed):
    """timm's patch embedding ending in a batch norm (in train mode), as hybrid ViTs' convolutional stems do."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.proj = torch.nn.Sequential(self.proj, torch.nn.BatchNorm2d(self.proj.out_channels))


def test_training_keeps_batch_norms_at_the_backbones_statistics(tmp_path):
    # adapter files hold no buffers: statistics updated in training would be lost (save_adapter refuses them)
    kwargs = {**TINY["backbone_kwargs"], "embed_layer": _PatchEmbedWithBatchNorm}
    module = FewShotClassifier(**{**TINY, "backbone_kwargs": kwargs}, num_classes=4, adapter=NOLA,
                               adapter_dir=str(tmp_path / "adapter"))
    norm = module.model.patch_embed.proj[1]
    before = norm.running_mean.clone(), norm.running_var.clone()
    trainer(tmp_path, epochs=1, limit_train_batches=2).fit(module, loader())
    assert torch.equal(norm.running_mean, before[0]) and torch.equal(norm.running_var, before[1])
    assert (tmp_path / "adapter").is_dir()  # exported at the end of the fit, which changed statistics would refuse
    assert module.train().model.training and not norm.training


def test_full_fine_tuning_stored_below_16_bits_is_refused_before_training(tmp_path):
    # save_adapter refused it after the whole fit had run (a checkpoint of such a run still loads for test)
    module = FewShotClassifier(**TINY, num_classes=4, adapter="full", adapter_bits=8)
    fit = trainer(tmp_path, epochs=1, limit_train_batches=2)
    with pytest.raises(ValueError, match=r"adapter_bits=8 would store a fully fine-tuned backbone as 8-bit codes"):
        fit.fit(module, loader())
    assert fit.global_step == 0


def test_exported_adapter_matches_trained_model(tmp_path):
    L.seed_everything(1)
    model = FewShotClassifier(num_classes=4, adapter=NOLA, adapter_dir=str(tmp_path / "a"), adapter_bits=32, **TINY)
    trainer(tmp_path, enable_checkpointing=False).fit(model, loader())
    base = load_adapter(_plain_tiny(), tmp_path / "a").eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(base(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_every_rank_knows_where_rank_0_exports_the_adapter(tmp_path, monkeypatch):
    """Under DDP a failure on rank 1 after the fit (an undecodable test image) named 'adapter None': only rank 0, which
    exports it, kept where the adapter went."""
    L.seed_everything(1)
    model = FewShotClassifier(num_classes=4, adapter=NOLA, adapter_dir=str(tmp_path / "a"), **TINY)
    fit = trainer(tmp_path, epochs=1, enable_checkpointing=False)
    monkeypatch.setattr(L.Trainer, "is_global_zero", property(lambda self: False))  # as rank 1 sees it
    fit.fit(model, loader())
    assert model.exported_adapter_dir is None and model.export_target == tmp_path / "a"
    assert not (tmp_path / "a").exists()  # rank 1 exports nothing


class TrainedTensorsAtStart(L.Callback):
    """Keeps the trained tensors as training starts: after a resume, those the checkpoint restored."""

    def on_train_start(self, trainer, pl_module):
        self.tensors = {key: value.clone() for key, value in pl_module.trained_state_dict().items()}


@pytest.mark.parametrize("precision", ["32-true", "64-true"])
def test_resume_starts_from_the_checkpoints_weights_and_ends_as_an_uninterrupted_run(tmp_path, precision):
    # 64-true: Lightning loaded the checkpoint before its precision plugin cast the module to float64, so the run's
    # float64 values went through float32 parameters and the resume started 1e-9 off
    def fit(root, ckpt_path=None, seed=0, **kwargs):
        L.seed_everything(seed)
        model = FewShotClassifier(num_classes=4, adapter=LoRAConfig(rank=2), **TINY)
        start = TrainedTensorsAtStart()
        run = trainer(root, epochs=2, callbacks=[start], precision=precision, **kwargs)
        run.fit(model, loader(), ckpt_path=ckpt_path)
        return run, model, start.tensors

    fit(tmp_path / "first", max_steps=4)  # a 2-epoch run stopped after its first epoch
    ckpt = next((tmp_path / "first" / "checkpoints").glob("*.ckpt"))
    resumed_run, resumed, at_resume = fit(tmp_path / "resumed", ckpt_path=ckpt, seed=1)  # another fresh init
    assert resumed_run.current_epoch == 2 and resumed_run.global_step == 8
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert at_resume.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(at_resume[key], value), key
    _, uninterrupted, _ = fit(tmp_path / "uninterrupted")
    for key, value in uninterrupted.trained_state_dict().items():  # optimiser moments and schedule restored too
        torch.testing.assert_close(resumed.trained_state_dict()[key], value, rtol=0, atol=1e-7, msg=key)


def test_a_run_under_a_gradient_accumulation_schedule_resumes_and_another_schedule_is_refused(tmp_path):
    # the checkpoint recorded the trainer's value of its epoch (2): the resume, whose trainer holds 1 until the
    # callback sets it, was refused, and passing 2 is refused by Lightning beside the callback
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    def fit(root, schedule, ckpt_path=None, **kwargs):
        model = FewShotClassifier(num_classes=4, adapter=NOLA, warmup_epochs=0, **TINY)
        run = trainer(root, epochs=3, callbacks=[GradientAccumulationScheduler(schedule)], **kwargs)
        run.fit(model, loader(), ckpt_path=ckpt_path)
        return run

    fit(tmp_path / "first", {0: 1, 1: 2}, max_steps=6)  # stopped after epoch 1, accumulating 2 batches
    ckpt = next((tmp_path / "first" / "checkpoints").glob("*.ckpt"))
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1
    assert fit(tmp_path / "resumed", {0: 1, 1: 2}, ckpt_path=ckpt).current_epoch == 3
    with pytest.raises(ValueError, match=r"trainer.accumulate_grad_batches \{'GradientAccumulationScheduler': "
                                         r"\{0: 1, 1: 4\}\} \(checkpoint: \{'GradientAccumulationScheduler': "
                                         r"\{0: 1, 1: 2\}"):
        fit(tmp_path / "other", {0: 1, 1: 4}, ckpt_path=ckpt)


def test_checkpoint_on_a_different_frozen_backbone_is_refused(tmp_path):
    model = FewShotClassifier(num_classes=4, adapter=NOLA, **TINY)
    trainer(tmp_path, epochs=1).fit(model, loader())
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    with pytest.raises(ValueError, match="different frozen backbone"):
        FewShotClassifier.load_from_checkpoint(ckpt, backbone_seed=1)


def test_resuming_a_run_whose_max_time_is_spent_is_refused_and_more_time_resumes(tmp_path):
    # the Timer restores the time trained: the resume trained nothing, yet exported and tested as a new run
    from lightning.pytorch.callbacks import Timer

    def fit(root, max_time, ckpt_path=None):
        model = FewShotClassifier(num_classes=4, adapter=NOLA, warmup_epochs=0, adapter_dir=str(root / "adapter"),
                                  **TINY)
        run = trainer(root, epochs=1000, callbacks=[Timer(max_time, interval="epoch")])  # stops at an epoch's end
        run.fit(model, loader(), ckpt_path=ckpt_path)
        return run

    with pytest.warns(UserWarning, match="trainer.max_time stopped the fit"):
        first = fit(tmp_path / "first", {"seconds": 1})
    ckpt = next((tmp_path / "first" / "checkpoints").glob("*.ckpt"))
    with pytest.raises(ValueError, match=r"after training for 1 s, and trainer.max_time \(--trainer.max_time, or a "
                                         r"Timer callback's duration\) of 1 s counts that time: .*train nothing.* "
                                         r"--trainer.max_time 00:00:01:00\)"):
        fit(tmp_path / "resumed", {"seconds": 1}, ckpt_path=ckpt)
    assert not (tmp_path / "resumed" / "adapter").exists()
    with pytest.warns(UserWarning, match="trainer.max_time stopped the fit"):
        more = fit(tmp_path / "more", {"seconds": 2}, ckpt_path=ckpt)
    assert more.global_step > first.global_step


def test_max_time_running_out_inside_the_last_epoch_warns_that_part_of_it_never_trained(tmp_path):
    # Lightning counts the cut-short last epoch as done ("max_epochs=2 reached"): the fit exported and tested silently
    import time

    from lightning.pytorch.callbacks import Callback, Timer

    class SlowLastEpoch(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.current_epoch == 1:
                time.sleep(4)

    model = FewShotClassifier(num_classes=4, adapter=NOLA, warmup_epochs=0, **TINY)
    run = trainer(tmp_path, epochs=2, callbacks=[Timer({"seconds": 3}, interval="step"), SlowLastEpoch()])
    with pytest.warns(UserWarning, match=r"max_time stopped the fit inside its last epoch \(1 of max_epochs=2 epochs "
                                         r"done\): part of that epoch's batches never trained"):
        run.fit(model, loader())
    assert 4 < run.global_step < 8  # 4 batches of epoch 0, not all 4 of epoch 1


def test_a_checkpoint_damaged_on_disk_is_refused_instead_of_evaluated(tmp_path):
    # torch.load does not check the zip's CRCs: a flipped exponent bit made head weights 1e37, and test scored them
    model = FewShotClassifier(num_classes=4, adapter=NOLA, **TINY)
    trainer(tmp_path, epochs=1).fit(model, loader())
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    data = bytearray(ckpt.read_bytes())
    weights = model.model.head.weight.detach().numpy().tobytes()
    at = data.find(weights)
    assert at > 0 and data.find(weights, at + 1) < 0
    data[at + 3] ^= 0x40  # the exponent of the head's first weight
    ckpt.write_bytes(data)
    with pytest.raises(ValueError, match=r"trained tensors are not those it was saved with .*damaged .*Use another "
                                         "checkpoint of the run, or the adapter it exported"):
        FewShotClassifier.load_from_checkpoint(ckpt)
    edited = torch.load(ckpt, weights_only=False)
    del edited["nola_vision"]["trained_sha256"], edited["nola_vision"]["record_sha256"]  # written before the hashes
    torch.save(edited, tmp_path / "older.ckpt")
    FewShotClassifier.load_from_checkpoint(tmp_path / "older.ckpt")


def test_a_checkpoint_whose_optimizer_state_was_damaged_is_not_resumed(tmp_path):
    # only the trained tensors were hashed: a flipped exponent bit in an Adam moment resumed silently, and the exported
    # coefficients came out 2,000 times too large
    def fit(root, ckpt_path=None, **kwargs):
        model = FewShotClassifier(num_classes=4, adapter=NOLA, **TINY)
        trainer(root, epochs=2, **kwargs).fit(model, loader(), ckpt_path=ckpt_path)

    fit(tmp_path / "first", max_steps=4)  # a 2-epoch run stopped after its first epoch
    ckpt = next((tmp_path / "first" / "checkpoints").glob("*.ckpt"))
    fit(tmp_path / "whole", ckpt_path=ckpt)  # untouched, it resumes (nothing a load rewrites counts as damage)
    moments = torch.load(ckpt, weights_only=False)["optimizer_states"][0]["state"]
    data = bytearray(ckpt.read_bytes())
    moment = max((state["exp_avg"] for state in moments.values()), key=torch.Tensor.numel).numpy().tobytes()
    at = data.find(moment)
    assert at > 0 and data.find(moment, at + 1) < 0
    data[at + 3] ^= 0x40  # the exponent of its first value
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(data)
    with pytest.raises(ValueError, match=r"checkpoint's optimizer_states are not those it was saved with .*damaged .*"
                                         r"Resume from another checkpoint of the run"):
        fit(tmp_path / "resumed", ckpt_path=damaged)
    model = FewShotClassifier(num_classes=4, adapter=NOLA, **TINY)
    with pytest.warns(UserWarning, match=r"optimizer_states are not those .*trained tensors are whole, so it evaluates "
                                         "as saved, but a fit cannot resume from it"):
        trainer(tmp_path / "test").test(model, loader(), ckpt_path=damaged)
    edited = torch.load(damaged, weights_only=False)
    saved_with = edited["nola_vision"]["lightning_version"]
    edited["nola_vision"]["lightning_version"] = "2.0.0"  # another Lightning's load may migrate the entries: a warning
    edited["nola_vision"]["record_sha256"] = nested_sha256({k: v for k, v in edited["nola_vision"].items()
                                                            if k != "record_sha256"})  # as that Lightning's run wrote
    torch.save(edited, tmp_path / "migrated.ckpt")
    with pytest.warns(UserWarning, match=r"or upgraded by Lightning's checkpoint migration \(it was saved under "
                                         "Lightning 2.0.0"):
        fit(tmp_path / "migrated", ckpt_path=tmp_path / "migrated.ckpt")
    edited["nola_vision"]["lightning_version"] = saved_with
    del edited["nola_vision"]["resume_sha256"], edited["nola_vision"]["record_sha256"]  # before the hashes: resumes
    torch.save(edited, tmp_path / "older.ckpt")
    fit(tmp_path / "older", ckpt_path=tmp_path / "older.ckpt")


def test_a_checkpoint_whose_hyper_parameters_or_record_were_damaged_is_not_resumed(tmp_path):
    # the hyper-parameters were left out of the hash, and a resume builds its model from them (the CLI, and
    # load_from_checkpoint): a flipped bit halving label_smoothing resumed silently at 0.05
    def fit(root, model=None, ckpt_path=None, **kwargs):
        model = model or FewShotClassifier(num_classes=4, adapter=NOLA, label_smoothing=0.1, **TINY)
        trainer(root, epochs=2, **kwargs).fit(model, loader(), ckpt_path=ckpt_path)

    fit(tmp_path / "first", max_steps=4)
    ckpt = next((tmp_path / "first" / "checkpoints").glob("*.ckpt"))
    edited = torch.load(ckpt, weights_only=False)
    edited["hyper_parameters"]["label_smoothing"] = 0.05
    torch.save(edited, tmp_path / "damaged.ckpt")
    resumed = FewShotClassifier.load_from_checkpoint(tmp_path / "damaged.ckpt")  # builds the module from them
    assert resumed.hparams.label_smoothing == 0.05
    with pytest.raises(ValueError, match=r"checkpoint's hyper_parameters are not those it was saved with"):
        fit(tmp_path / "resumed", resumed, ckpt_path=tmp_path / "damaged.ckpt")
    # load_from_checkpoint's own keyword arguments update them in place: no damage
    overridden = FewShotClassifier.load_from_checkpoint(ckpt, label_smoothing=0.1, num_classes=4)
    assert overridden.hparams.label_smoothing == 0.1
    fit(tmp_path / "overridden", overridden, ckpt_path=ckpt)
    edited = torch.load(ckpt, weights_only=False)
    edited["nola_vision"]["lightning_version"] = "2.0.0"  # would turn any refusal of the entries into a warning
    torch.save(edited, tmp_path / "record.ckpt")
    with pytest.raises(ValueError, match=r"checkpoint's record \(checkpoint\['nola_vision'\].*is not the one it was "
                                         r"saved with .*delete its checkpoint\['nola_vision'\]\['record_sha256'\]"):
        fit(tmp_path / "record", ckpt_path=tmp_path / "record.ckpt")


def test_the_resume_state_digest_tells_each_entry_by_value_and_type():
    from nola_vision.train.checkpoint_io import changed_resume_state, resume_state_sha256

    checkpoint = {"epoch": 1, "loops": {"fit": {"step": 3, "rate": 0.5, "seen": [1, 2]}}, "hyper_parameters": {"lr": 1},
                  "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-3}]}]}
    recorded = resume_state_sha256(checkpoint)
    assert set(recorded) == {"epoch", "loops", "hyper_parameters", "optimizer_states"}
    for path, value in [(("epoch",), 1.0), (("loops", "fit", "rate"), 0.5000001), (("loops", "fit", "seen"), (1, 2)),
                        (("optimizer_states", 0, "param_groups", 0, "lr"), 1e-2),
                        (("optimizer_states", 0, "state", 0, "exp_avg"), torch.ones(3, dtype=torch.float64))]:
        changed = copy.deepcopy(checkpoint)
        entry = changed
        for key in path[:-1]:
            entry = entry[key]
        entry[path[-1]] = value
        assert changed_resume_state(changed, recorded) == [path[0]], path
    assert changed_resume_state({**checkpoint, "added": 1}, recorded) == []
    other_rate = {**checkpoint, "hyper_parameters": {"lr": 2}}  # what load_from_checkpoint(lr=2) gives the module
    assert changed_resume_state(other_rate, recorded) == ["hyper_parameters"]
    assert changed_resume_state(other_rate, recorded, skip=["hyper_parameters"]) == []
    assert changed_resume_state({k: v for k, v in checkpoint.items() if k != "loops"}, recorded) == ["loops"]
    # paths by their text, other objects alike: their classes' modules move between versions (pathlib._local)
    assert nested_sha256(Path("a")) != nested_sha256(Path("b")) and nested_sha256(object()) == nested_sha256(len)


def test_a_checkpoint_onto_a_backbone_that_holds_its_own_update_already_is_refused(tmp_path):
    # merge_and_unload's weights saved as a state dict and given as pretrained_file: under the fingerprint's tolerance,
    # so the checkpoint loaded and its update counted twice (load_adapter refused the same run's adapter file)
    from safetensors.torch import save_file

    model = FewShotClassifier(num_classes=4, adapter=LoRAConfig(rank=2), **TINY).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in nv.adapted_layers(model.model).values():
            layer.lora_A.normal_(0, 0.01)  # an update under 1% of the weights: within the fingerprint's tolerance
            layer.lora_B.normal_(0, 0.01)
    checkpoint = _checkpoint_of(model)
    merged = nv.merge_and_unload(copy.deepcopy(model.model))
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, tmp_path / "merged.safetensors")
    on_merged = FewShotClassifier(num_classes=4, adapter=LoRAConfig(rank=2), **{
        **TINY, "pretrained": True, "pretrained_file": str(tmp_path / "merged.safetensors")})
    with pytest.raises(ValueError, match=r"checkpoint's adapter .* is already merged into this backbone's frozen "
                                         r"weights .*a second time"):
        on_merged.on_load_checkpoint(checkpoint)
    FewShotClassifier(num_classes=4, adapter=LoRAConfig(rank=2), **TINY).on_load_checkpoint(_checkpoint_of(model))


def _checkpoint_of(model: FewShotClassifier) -> dict:
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)  # what Lightning writes
    return checkpoint


@pytest.mark.parametrize("other", [dict(seed=7), dict(scale=8.0), dict(num_basis_a=8)])
def test_checkpoint_of_another_adapter_config_is_refused_naming_the_field(other):
    model = FewShotClassifier(num_classes=4, adapter=NOLA, **TINY)
    checkpoint = _checkpoint_of(model)
    FewShotClassifier(num_classes=4, adapter=NOLA, **TINY).on_load_checkpoint(checkpoint)  # same config: loads
    field = next(iter(other))
    changed = FewShotClassifier(num_classes=4, adapter=dataclasses.replace(NOLA, **other), **TINY)
    with pytest.raises(ValueError, match=rf"another adapter config \({field}="):
        changed.on_load_checkpoint(_checkpoint_of(model))


def test_a_checkpoint_loads_into_a_model_given_its_targets_in_another_order_with_the_same_outputs():
    """The targets' order selects nothing (an adapter file loads either way), but a checkpoint compared the configs as
    written and refused one given them in another order."""
    config = dataclasses.replace(NOLA, targets=["mlp.fc1", "attn.v"])
    model = FewShotClassifier(num_classes=4, adapter=config, **TINY)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.1)
    checkpoint = _checkpoint_of(model)
    reordered = FewShotClassifier(num_classes=4, adapter=dataclasses.replace(NOLA, targets=["attn.v", "mlp.fc1"]),
                                  **TINY)
    reordered.on_load_checkpoint(copy.deepcopy(checkpoint))
    reordered.load_state_dict(checkpoint["state_dict"], strict=False)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(reordered.eval()(images), model.eval()(images), rtol=0, atol=0)


def test_checkpoint_of_a_backbone_with_other_attention_heads_is_refused():
    checkpoint = _checkpoint_of(FewShotClassifier(num_classes=4, adapter=NOLA, **TINY))
    other = {**TINY, "backbone_kwargs": {**TINY["backbone_kwargs"], "num_heads": 4}}  # the same weights
    with pytest.raises(ValueError, match=r"attention_heads \[4, 4\] \(checkpoint: \[2, 2\]\).*backbone_kwargs"):
        FewShotClassifier(num_classes=4, adapter=NOLA, **other).on_load_checkpoint(checkpoint)


def test_checkpoint_of_a_backbone_with_other_pooling_is_refused():
    # the same weights pooled by averaging instead of the class token: logits off by 3, and it loaded
    kwargs = {**TINY["backbone_kwargs"], "global_pool": "avg", "fc_norm": False}
    checkpoint = _checkpoint_of(FewShotClassifier(num_classes=4, adapter=NOLA, **{**TINY, "backbone_kwargs": kwargs}))
    with pytest.raises(ValueError, match=r"global_pool token \(checkpoint: avg\).*backbone_kwargs"):
        FewShotClassifier(num_classes=4, adapter=NOLA, **TINY).on_load_checkpoint(checkpoint)


def test_checkpoint_with_other_random_bases_or_none_recorded():
    model = FewShotClassifier(num_classes=4, adapter=NOLA, **TINY)
    checkpoint = _checkpoint_of(model)
    checkpoint["nola_vision"]["basis_fingerprint"] = "0" * 64  # as written by another generator version
    del checkpoint["nola_vision"]["record_sha256"]  # (before the record's hash)
    with pytest.raises(ValueError, match="random bases come from generator"):
        FewShotClassifier(num_classes=4, adapter=NOLA, **TINY).on_load_checkpoint(checkpoint)
    older = _checkpoint_of(model)
    # a checkpoint written before they were recorded
    for key in ("adapter", "basis_fingerprint", "generator_version", "settings", "record_sha256"):
        del older["nola_vision"][key]
    FewShotClassifier(num_classes=4, adapter=NOLA, **TINY).on_load_checkpoint(older)


def test_checkpoint_without_a_record_must_hold_every_trained_tensor():
    # Another project's checkpoint loaded non-strictly left the model untrained, and test scored it with exit 0.
    model = FewShotClassifier(num_classes=4, adapter=NOLA, **TINY)
    foreign = {"state_dict": {"net.fc.weight": torch.zeros(4, 8)}}
    with pytest.raises(ValueError, match=r"no nola_vision record and lacks \d+ of this model's \d+ trained tensors .*"
                                         r"its keys \['net.fc.weight'\]"):
        FewShotClassifier(num_classes=4, adapter=NOLA, **TINY).on_load_checkpoint(foreign)
    partial = _checkpoint_of(model)
    del partial["nola_vision"], partial["state_dict"]["model.head.weight"]
    with pytest.raises(ValueError, match=r"lacks 1 of .*\['model.head.weight'\]"):
        FewShotClassifier(num_classes=4, adapter=NOLA, **TINY).on_load_checkpoint(partial)
    older = _checkpoint_of(model)
    del older["nola_vision"]  # written before the record: whole, so it loads
    FewShotClassifier(num_classes=4, adapter=NOLA, **TINY).on_load_checkpoint(older)


def test_random_backbone_is_the_same_in_every_process_but_the_head_follows_the_run_seed():
    torch.manual_seed(0)
    a = FewShotClassifier(num_classes=4, **TINY)
    torch.manual_seed(1)
    b = FewShotClassifier(num_classes=4, **TINY)
    assert a.backbone_fingerprint() == b.backbone_fingerprint()
    torch.testing.assert_close(a.model.blocks[0].attn.qkv.weight, b.model.blocks[0].attn.qkv.weight)
    assert not torch.equal(a.model.head.weight, b.model.head.weight)


def test_unknown_backbone_names_close_matches():
    with pytest.raises(ValueError, match="vit_tiny_patch16_224"):
        FewShotClassifier(**{**TINY, "backbone": "vit_tiny_patch16_22"})
    with pytest.raises(ValueError, match="Available: vit_base_patch16_224.augreg"):
        FewShotClassifier(**{**TINY, "backbone": "vit_base_patch16_224.nonexistent"})


def test_target_that_matches_nothing_fails_naming_the_linear_layers():
    with pytest.raises(ValueError, match=r"matches no nn.Linear.*blocks\.\*\.mlp\.fc1"):
        FewShotClassifier(num_classes=4, adapter=NOLAConfig(targets=["mlp.fc3"]), **TINY)


def test_adapter_argument_forms():
    nola = NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8)
    assert resolve_adapter(adapter_to_hparam(nola)) == nola
    assert resolve_adapter(nola.to_dict()) == nola
    flat = {k: v for k, v in nola.to_dict().items() if k != "method"}
    assert resolve_adapter(flat) == nola
    assert resolve_adapter({"rank": 2, "alpha": 4.0}) == LoRAConfig(rank=2, alpha=4.0)
    assert resolve_adapter("full") == "full"
    with pytest.raises(ValueError, match="'linear', 'full'"):
        resolve_adapter("lienar")


def test_quantisation_aware_training_and_export_bits(tmp_path):
    model = FewShotClassifier(num_classes=4, adapter=NOLA, quant_bits=4, adapter_dir=str(tmp_path / "q"), **TINY)
    assert {layer.quant_bits for layer in model.model.modules() if hasattr(layer, "quant_bits")} == {4}
    trainer(tmp_path, epochs=1, enable_checkpointing=False).fit(model, loader())
    import json

    assert json.loads((tmp_path / "q" / "adapter_config.json").read_text())["bits"] == 4
    # The exported 4-bit file gives the trained model's logits (its head too: seen at the 8 bits the file keeps).
    exported = load_adapter(_plain_tiny(), tmp_path / "q").eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(exported(x), model.eval()(x))
    with pytest.raises(ValueError, match="quant_bits"):  # a linear probe takes it (test_adapter_formats)
        FewShotClassifier(num_classes=4, adapter="full", quant_bits=4, **TINY)


def test_logs_metrics_and_parameter_counts(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    model = FewShotClassifier(num_classes=4, adapter=NOLA, adapter_dir=str(tmp_path / "a"), **TINY)
    t = L.Trainer(accelerator="cpu", max_epochs=1, logger=CSVLogger(tmp_path), enable_progress_bar=False,
                  enable_checkpointing=False, log_every_n_steps=1)
    t.fit(model, loader(), loader(seed=1))
    t.test(model, loader(seed=2))
    text = (Path(t.log_dir) / "metrics.csv").read_text()
    for key in ("train/loss_step", "train/acc", "val/acc", "test/acc", "params/adapter", "params/head"):
        assert key in text
    assert model.parameter_counts["adapter"] == 2 * 2 * (16 + 16)  # 2 blocks x (fc1, fc2) x (k + l)
    assert model.parameter_counts["head"] == 64 * 4 + 4


@pytest.mark.parametrize("adapter", [NOLA, "linear", "full"])
def test_trainable_count_is_what_the_method_trains_also_after_freeze(adapter):
    model = FewShotClassifier(num_classes=4, adapter=adapter, **TINY)
    counts = model.parameter_counts
    assert counts["trainable"] == sum(p.numel() for p in model.model.parameters() if p.requires_grad) > 0
    if adapter != "full":
        assert counts["trainable"] == counts["adapter"] + counts["head"]
    model.freeze()  # before inference: requires_grad is off everywhere, the method still trains the same tensors
    assert model.parameter_counts == counts


def test_cosine_schedule_per_epoch_reaches_min_lr():
    f = cosine_factor(50, 5e-3, 1e-6)
    assert f(0) == 1.0
    assert math.isclose(f(25), (1 + 1e-6 / 5e-3) / 2)
    assert math.isclose(f(50) * 5e-3, 1e-6)
    # same values as torch's CosineAnnealingLR stepped per epoch
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50, eta_min=1e-6)
    for epoch in range(1, 50):
        opt.step(), sched.step()
        assert math.isclose(opt.param_groups[0]["lr"], 5e-3 * f(epoch), rel_tol=1e-6)
    w = cosine_factor(10, 1.0, 0.0, warmup_epochs=2)
    assert [round(w(e), 3) for e in (0, 1, 2)] == [0.333, 0.667, 1.0]


def test_optimizers_and_lr_validation():
    for name, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)):
        model = FewShotClassifier(num_classes=4, optimizer=name, **TINY)
        model.trainer = L.Trainer(max_epochs=3, logger=False)
        config = model.configure_optimizers()
        assert isinstance(config["optimizer"], cls)
        assert config["lr_scheduler"]["interval"] == "epoch"
        params = {id(p) for g in config["optimizer"].param_groups for p in g["params"]}
        assert params == {id(p) for p in model.model.head.parameters()}
    with pytest.raises(ValueError, match="min_lr"):
        FewShotClassifier(num_classes=4, lr=1e-6, min_lr=1e-3, **TINY)


def test_learning_rates_default_to_the_method_recipe_and_the_head_gets_its_own_group():
    import nola_vision as nv

    def group_lrs(model):
        model.trainer = L.Trainer(max_epochs=3, logger=False)
        head = {id(p) for p in model.model.head.parameters()}
        return {("head" if id(g["params"][0]) in head else "adapter"): g["lr"]
                for g in model.configure_optimizers()["optimizer"].param_groups}

    recipe = nv.get_method("nola")
    assert group_lrs(FewShotClassifier(num_classes=4, adapter=NOLA, warmup_epochs=0, **TINY)) == {  # at the peak
        "adapter": recipe.default_lr, "head": recipe.default_head_lr or recipe.default_lr}
    # a given lr is the head's too unless head_lr is given
    assert group_lrs(FewShotClassifier(num_classes=4, adapter=NOLA, lr=1e-3, warmup_epochs=0, **TINY)) == {
        "adapter": 1e-3, "head": 1e-3}
    assert group_lrs(FewShotClassifier(num_classes=4, adapter=NOLA, lr=1e-3, head_lr=4e-3, warmup_epochs=0,
                                       **TINY)) == {
        "adapter": 1e-3, "head": 4e-3}
    lora = FewShotClassifier(num_classes=4, adapter=LoRAConfig(rank=2), **TINY)
    assert lora.hparams.lr == nv.get_method("lora").default_lr  # resolved values are what checkpoints keep


def _group_lrs(model):
    head = {id(p) for p in model.model.head.parameters()}
    return {("head" if id(g["params"][0]) in head else "adapter"): g["lr"]
            for g in model.configure_optimizers()["optimizer"].param_groups}


def test_lr_finders_rate_is_the_heads_too_unless_head_lr_was_given():
    """lr_find writes hparams.lr only: the head trained on at its old rate (20 times the adapter's), and a rate
    below min_lr made the cosine decay rise."""
    from lightning.pytorch.utilities.parsing import lightning_setattr

    model = FewShotClassifier(num_classes=4, adapter=NOLA, lr=5e-3, warmup_epochs=0, **TINY)
    lightning_setattr(model, "lr", 2.5e-4)  # how lr_find sets its suggestion
    model.trainer = L.Trainer(max_epochs=3, logger=False)
    assert _group_lrs(model) == {"adapter": 2.5e-4, "head": 2.5e-4}
    recipe = FewShotClassifier(num_classes=4, adapter=NOLA, warmup_epochs=0, **TINY)  # its own head rate: kept ratio
    recipe.trainer = L.Trainer(max_epochs=3, logger=False)
    ratio = recipe.hparams.head_lr / recipe.hparams.lr
    recipe.hparams.lr /= 10
    assert _group_lrs(recipe) == pytest.approx({"adapter": recipe.hparams.lr, "head": recipe.hparams.lr * ratio})
    set_since = FewShotClassifier(num_classes=4, adapter=NOLA, lr=1e-3, warmup_epochs=0, **TINY)
    set_since.trainer = L.Trainer(max_epochs=3, logger=False)
    lightning_setattr(set_since, "head_lr", 5e-2)  # a search of the head's rate first, then of lr
    lightning_setattr(set_since, "lr", 2e-3)
    assert _group_lrs(set_since) == {"adapter": 2e-3, "head": 5e-2}
    given = FewShotClassifier(num_classes=4, adapter=NOLA, lr=1e-3, head_lr=4e-3, warmup_epochs=0, **TINY)
    given.trainer = L.Trainer(max_epochs=3, logger=False)
    given.hparams.lr = 2e-3
    assert _group_lrs(given) == {"adapter": 2e-3, "head": 4e-3}
    given.hparams.lr = 1e-7
    with pytest.raises(ValueError, match=r"min_lr \(1e-06\) exceeds lr \(1e-07\), one of them set after the "
                                         r"classifier was built \(on its hparams, or by Lightning's lr_find\)"):
        given.configure_optimizers()


def test_the_learning_rate_finder_callbacks_rate_is_the_one_trained_and_recorded(tmp_path):
    # the callback sets its rate at fit start, after configure_optimizers: every group trained at the recipe's rate
    # (after a warning of a resume that was none) while checkpoints recorded the found one beside the old head rate
    from lightning.pytorch.callbacks import LearningRateFinder

    model = FewShotClassifier(num_classes=4, adapter=NOLA, lr=1e-3, warmup_epochs=0, **TINY)
    ratio = model.hparams.head_lr / model.hparams.lr
    finder = LearningRateFinder(min_lr=1e-4, max_lr=1e-1, num_training_steps=16, early_stop_threshold=None)
    logged = []

    class Once(Logger):  # as MLflow's: a parameter is logged once, never changed
        name, version = "once", 0

        def log_hyperparams(self, params, *args, **kwargs):
            logged.append(dict(params))

        def log_metrics(self, metrics, step=None):
            pass

    t = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, default_root_dir=tmp_path, logger=Once(),
                  enable_progress_bar=False, enable_model_summary=False, callbacks=[finder])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model, loader(96))  # 12 steps an epoch: the finder's 16 steps run within the fit's 2 epochs
    found = finder.optimal_lr.suggestion()
    assert found is not None and found != 1e-3 and not [w for w in caught if "resuming at epoch" in str(w.message)]
    head = {id(p) for p in model.model.head.parameters()}
    trained = {("head" if id(g["params"][0]) in head else "adapter"): g["initial_lr"]
               for g in t.optimizers[0].param_groups}
    assert trained == pytest.approx({"adapter": found, "head": found * ratio})
    saved = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)["hyper_parameters"]
    assert (saved["lr"], saved["head_lr"]) == pytest.approx((found, found * ratio))
    assert [(p["lr"], p["head_lr"]) for p in logged] == [pytest.approx((found, found * ratio))]  # once, as trained


def test_loggers_record_the_warmup_and_rates_a_fit_resolved():
    """Loggers record hparams_initial, taken before configure_optimizers resolved warmup_epochs: a logger's
    hparams.yaml said warmup_epochs null for a run that warmed up for 2 epochs."""
    from lightning.pytorch.utilities.parsing import lightning_setattr

    model = FewShotClassifier(num_classes=4, adapter=NOLA, lr=1e-3, **TINY)
    lightning_setattr(model, "lr", 2e-3)
    model.trainer = L.Trainer(max_epochs=20, logger=False)
    model.configure_optimizers()
    assert model.hparams.warmup_epochs == 2
    assert {key: model.hparams_initial[key] for key in ("warmup_epochs", "lr", "head_lr")} == {
        "warmup_epochs": 2, "lr": 2e-3, "head_lr": 2e-3}


def test_warmup_defaults_to_the_method_recipe_and_shapes_the_schedule():
    import nola_vision as nv

    def epoch_lrs(model, epochs):
        model.trainer = L.Trainer(max_epochs=epochs, logger=False)
        scheduler = model.configure_optimizers()["lr_scheduler"]["scheduler"]
        lrs = []
        for _ in range(epochs):
            lrs.append(scheduler.optimizer.param_groups[0]["lr"])
            scheduler.optimizer.step()
            scheduler.step()
        return lrs

    fraction = nv.get_method("nola").default_warmup_fraction
    assert fraction > 0 and round(20 * fraction) == 2  # the recipe warms NOLA up: 2 of the study's 20 epochs
    nola = FewShotClassifier(num_classes=4, adapter=NOLA, **TINY)
    assert nola.hparams.warmup_epochs is None  # resolved against max_epochs when training starts
    lrs = epoch_lrs(nola, 20)
    assert nola.hparams.warmup_epochs == 2  # ... and then kept, for the checkpoints
    assert lrs[:3] == pytest.approx([nola.hparams.lr * (e + 1) / 3 for e in range(3)])
    assert max(lrs) == pytest.approx(nola.hparams.lr) and lrs[-1] < lrs[2]
    # a short run warms up for at least an epoch (round(3 x 0.1) = 0), given room; a given value wins; 0 is the
    # paper's schedule
    assert epoch_lrs(FewShotClassifier(num_classes=4, adapter=NOLA, **TINY), 3)[:2] == pytest.approx(
        [nola.hparams.lr / 2, nola.hparams.lr])
    given = FewShotClassifier(num_classes=4, adapter=NOLA, warmup_epochs=4, **TINY)
    assert epoch_lrs(given, 20)[0] == pytest.approx(given.hparams.lr / 5) and given.hparams.warmup_epochs == 4
    paper = FewShotClassifier(num_classes=4, adapter=NOLA, warmup_epochs=0, **TINY)
    assert epoch_lrs(paper, 20)[0] == pytest.approx(paper.hparams.lr)
    # a warm-up as long as the run never reaches lr nor decays: said, not silent
    with pytest.warns(UserWarning, match=r"warmup_epochs=4 is not below trainer.max_epochs=3: .* never reaching"):
        too_long = epoch_lrs(FewShotClassifier(num_classes=4, adapter=NOLA, warmup_epochs=4, **TINY), 3)
    assert max(too_long) < given.hparams.lr
    with pytest.raises(ValueError, match="warmup_epochs"):
        FewShotClassifier(num_classes=4, adapter=NOLA, warmup_epochs=-1, **TINY)
    with pytest.raises(ValueError, match="default_warmup_fraction"):
        nv.register_method("nola", nv.NOLAConfig, nv.NOLALinear, default_warmup_fraction=1.0)


def test_registered_nola_variant_as_backbone_names_the_base_model():
    with pytest.raises(ValueError, match=r"registered NOLA variant.*vit_tiny_patch16_224\)"):
        FewShotClassifier(num_classes=4, adapter=NOLA, **{**TINY, "backbone": "vit_tiny_patch16_224_nola"})


def test_diverged_weights_are_never_exported(tmp_path):
    from nola_vision.train.module import NonFiniteLossError

    model = FewShotClassifier(num_classes=4, adapter=NOLA, adapter_dir=str(tmp_path / "adapter"), **TINY)
    with torch.no_grad():
        model.model.blocks[0].mlp.fc1.nola_alpha.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="nola_alpha"):
        model.on_fit_end()
    assert not (tmp_path / "adapter").exists()


def test_an_adapter_dir_holding_a_peft_export_is_refused_before_training(tmp_path):
    exporter = FewShotClassifier(num_classes=4, adapter=LoRAConfig(rank=2, targets=["attn.qkv"]), **TINY)
    nv.export_peft(exporter.model, tmp_path / "peft")
    exported = (tmp_path / "peft" / "adapter_model.safetensors").read_bytes()
    model = FewShotClassifier(num_classes=4, adapter=NOLA, adapter_dir=str(tmp_path / "peft"), **TINY)
    with pytest.raises(ValueError, match="holds a peft LoRA export .*another directory"):
        model.on_fit_start()  # what fit calls before the first step: the export is refused now, not after training
    assert (tmp_path / "peft" / "adapter_model.safetensors").read_bytes() == exported


def test_a_fit_without_a_training_batch_exports_nothing(tmp_path):
    """A loader with no batch (4 images, batch 8, drop_last): Lightning only warns and stops, and the untrained
    adapter was exported as the run's result."""
    module = FewShotClassifier(**TINY, num_classes=4, adapter=NOLA, adapter_dir=str(tmp_path / "adapter"))
    empty = DataLoader(loader(n=4).dataset, batch_size=8, drop_last=True)
    with pytest.raises(ValueError, match="the fit took no training step .*lower data.batch_size"):
        trainer(tmp_path, epochs=1).fit(module, empty)
    assert not (tmp_path / "adapter").exists()
    # a max_time that ran out before the first step was blamed on the batch size
    with pytest.raises(ValueError, match=r"took no training step \(trainer.max_time ran out .*give trainer.max_time"):
        trainer(tmp_path / "timed", epochs=1, max_time={"seconds": 0}).fit(module, loader())


def test_a_tilde_in_adapter_dir_is_the_home_folder(tmp_path, monkeypatch):
    # Only result_file and predictions_file were expanded: a config's "~/ad" exported into "<cwd>/~/ad".
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    model = FewShotClassifier(num_classes=4, adapter=NOLA, adapter_dir="~/ad", **TINY)
    assert model.hparams.adapter_dir == str(tmp_path / "home" / "ad")


def test_a_module_loaded_from_its_checkpoint_resolves_the_recipes_head_rate_and_warmup_again(tmp_path):
    """The checkpoint records the rates and warm-up its run resolved: loaded back as if given, the head kept its rate
    under a new lr (ten times the adapter's after a search) and the warm-up its epochs under another max_epochs."""
    model = FewShotClassifier(num_classes=4, adapter=NOLA, **TINY)  # head rate and warm-up left to the recipe
    trainer(tmp_path, epochs=2).fit(model, loader())
    saved = next((tmp_path / "checkpoints").glob("*.ckpt"))
    ratio = model.hparams.head_lr / model.hparams.lr
    for loaded in (FewShotClassifier.load_from_checkpoint(saved),
                   FewShotClassifier.load_from_checkpoint(saved, lr=3e-3)):
        loaded.hparams.lr = 3e-3
        loaded.trainer = L.Trainer(max_epochs=20, logger=False)
        rates = _group_lrs(loaded)  # at the warm-up's first epoch: both rates divided alike
        assert rates["head"] / rates["adapter"] == pytest.approx(ratio)
        assert loaded.hparams.head_lr == pytest.approx(3e-3 * ratio)
        assert loaded.hparams.warmup_epochs == 2  # the recipe's tenth of 20 epochs, not the 2-epoch run's 0
    for head_lr, warmup in ((5e-2, 5), (model.hparams.head_lr, 0)):  # given when loading, even the run's own values
        given = FewShotClassifier.load_from_checkpoint(saved, head_lr=head_lr, warmup_epochs=warmup)
        given.hparams.lr = 3e-3
        given.trainer = L.Trainer(max_epochs=20, logger=False)
        _group_lrs(given)
        assert (given.hparams.head_lr, given.hparams.warmup_epochs) == (head_lr, warmup)
