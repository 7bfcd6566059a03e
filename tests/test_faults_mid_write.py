"""An error (out of memory, a failed device) raised part-way through a merge, an unmerge or a task switch leaves the
model as it was: each torch op those use is made to fail on its Nth call, for N over the op's calls in one fault-free
run. A weight written with its merged flag not yet set made the retried merge add ΔW twice, for good; a switch that
stopped half-way served a mix of two tasks."""
import copy
import functools
from contextlib import contextmanager

import pytest
import torch
from ctrl_c_at_lines import body_lines, interrupted_at
from tiny_models import as_if_trained, tiny_vit

import nola_vision as nv

NOLA = nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16, targets=["mlp.fc1", "mlp.fc2", "attn.q", "attn.v"])
# The ops that write weights or allocate around the writes (ΔW's records, 16-bit rounding entries).
OPS = [(torch.Tensor, "clone"), (torch.Tensor, "addmm_"), (torch.Tensor, "copy_"), (torch.Tensor, "to"),
       (torch.Tensor, "cpu"), (torch.Tensor, "nonzero"), (torch.Tensor, "__setitem__"), (torch, "maximum"),
       (torch.Tensor, "fill_")]  # fill_: the merged flag's buffer, written after the weight it flagged as unmerged
SAMPLES = 8  # injection points per op, spread over its calls


class Injected(RuntimeError):
    pass


@contextmanager
def failing(owner, name, call):
    """``owner.name`` raises on its ``call``-th call inside the block (0: never); yields the count of calls."""
    original, calls = getattr(owner, name), [0]

    def fail_on_call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise Injected("out of memory (injected)")
        return original(*args, **kwargs)

    setattr(owner, name, fail_on_call)
    try:
        yield calls
    finally:
        setattr(owner, name, original)


def injection_points(owner, name, action, model):
    """Calls of the op to fail on: evenly spread over its calls in a fault-free run of ``action`` on a copy (once
    the process holds what a first run caches, such as the bases' codes)."""
    action(copy.deepcopy(model))
    counted = copy.deepcopy(model)
    with failing(owner, name, 0) as calls:
        action(counted)
    count = calls[0]
    return sorted({1 + i * count // SAMPLES for i in range(SAMPLES)}) if count else []


def outputs(model, images):
    with torch.no_grad():
        return model(images.to(next(model.parameters()).dtype)).float()


def base_weights():
    return {key: value for key, value in tiny_vit().state_dict().items() if not key.startswith("head")}


def assert_base_weights_back(model, dtype):
    """After unmerge and unload, the frozen weights are the backbone's (a ΔW added twice left 0.05 in them)."""
    nv.unload(nv.unmerge(model))
    state = model.state_dict()
    for key, value in base_weights().items():
        torch.testing.assert_close(state[key].float(), value.to(dtype).float(), rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    for seed, name in enumerate("ab"):
        nv.save_adapter(as_if_trained(nv.inject(tiny_vit(), NOLA), seed, scale=0.5, adapters_only=True), root / name,
                        bits=32)
    return root


def sweep(model, action, images, expect_unchanged, dtype, ops=OPS):
    """Fail each op at each injection point in ``action(model copy)``: the copy must be left as it was, and the
    action, tried again without the fault, must do what it does without one."""
    with torch.no_grad():
        fault_free = copy.deepcopy(model)
        action(fault_free)
        done = outputs(fault_free, images)
    before, tried = outputs(model, images), 0
    flags = [layer.merged for layer in nv.adapted_layers(model).values()]
    records = [layer.unmerged_record is not None for layer in nv.adapted_layers(model).values()]
    for owner, name in ops:
        for call in injection_points(owner, name, action, model):
            faulted = copy.deepcopy(model)
            with failing(owner, name, call), pytest.raises(Injected):
                action(faulted)
            tried += 1
            where = f"{name} call {call}"
            layers = nv.adapted_layers(faulted).values()
            assert [layer.merged for layer in layers] == flags, where
            assert [bool(layer.adapter_merged) for layer in layers] == flags, where  # the state dict's flags too
            assert [layer.unmerged_record is not None for layer in layers] == records, where  # kept by an undone switch
            expect_unchanged(outputs(faulted, images), before, where)
            action(faulted)  # the retry
            torch.testing.assert_close(outputs(faulted, images), done, rtol=0, atol=1e-5, msg=where)
            assert_base_weights_back(faulted, dtype)
    assert tried > 10  # ops that ran, each failed at several of its calls


def unchanged(atol):
    def check(now, before, where):
        torch.testing.assert_close(now, before, rtol=0, atol=atol, msg=where)
    return check


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_merge_or_unmerge_that_fails_part_way_leaves_every_layer_as_it_was(tasks, images, dtype):
    model = nv.load_adapter(tiny_vit(), tasks / "a").to(dtype)
    # and the layer's own bookkeeping around its weight write (a failed record left a merged layer without one)
    ops = OPS + [(nv.AdaptedLinear, "_hold_merged_tensors"), (nv.AdaptedLinear, "_set_merged_update")]
    sweep(model, nv.merge, images, unchanged(1e-5), dtype, ops)
    sweep(nv.merge(model), nv.unmerge, images, unchanged(1e-5), dtype, ops)


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_task_switch_that_fails_part_way_leaves_the_previous_task_whole(tasks, images, merged, dtype):
    model = nv.load_adapter(tiny_vit(), tasks / "a").to(dtype)
    if merged:
        nv.merge(model)
    sweep(model, lambda m: nv.load_adapter(m, tasks / "b"), images, unchanged(1e-5 if dtype == torch.float32 else 0),
          dtype, OPS + [(nv.AdaptedLinear, "_set_merged_update")])


def hooks_of(model):
    return sorted((name, kind, len(getattr(module, kind))) for name, module in model.named_modules()
                  for kind in ("_forward_hooks", "_forward_pre_hooks", "_load_state_dict_post_hooks",
                               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks"))


@pytest.mark.parametrize("owner, name", [(torch.nn.Module, "register_forward_hook"),
                                         (torch.nn.Module, "register_forward_pre_hook"),
                                         (torch.nn.Module, "__setattr__"), (torch.nn.Module, "requires_grad_"),
                                         (torch.Tensor, "requires_grad_")])
@pytest.mark.parametrize("config", [NOLA, nv.LoRAConfig(rank=2, targets=["attn.q", "attn.v", "mlp.fc2"])],
                         ids=["nola", "lora"])
def test_an_inject_that_fails_part_way_leaves_the_model_as_it_was(owner, name, config, images):
    """It left adapted layers, a frozen backbone and hooks on a model without adapter state: neither inject nor unload
    took it again ("already holds adapter layers", "has no nola_vision adapters")."""
    def inject(model):
        nv.inject(model, config)

    plain = tiny_vit().train()
    before = {key: value.clone() for key, value in plain.state_dict().items()}
    flags, hooks = [p.requires_grad for p in plain.parameters()], hooks_of(plain)
    fault_free = tiny_vit()
    inject(fault_free)
    points = injection_points(owner, name, inject, plain)
    for call in points:
        model = copy.deepcopy(plain)
        with failing(owner, name, call), pytest.raises(Injected):
            inject(model)
        where = f"{name} call {call}"
        assert not nv.adapted_layers(model) and not any("Moved" in type(m).__name__ for m in model.modules()), where
        assert [p.requires_grad for p in model.parameters()] == flags and hooks_of(model) == hooks, where
        assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items()), where
        assert all(module.training for module in model.modules()), where
        inject(model)  # the retry
        torch.testing.assert_close(outputs(model.eval(), images), outputs(fault_free, images), rtol=0, atol=0)
    assert points


def test_an_undo_that_fails_too_says_the_model_is_left_partly_changed(tasks, images):
    """A second failure while undoing a failed switch left a mix of two tasks behind the undo's own error, which said
    nothing of it (and save_adapter then saved the mix)."""
    model = nv.load_adapter(tiny_vit(), tasks / "a")
    original, calls = torch.Tensor.copy_, [0]

    def fails_twice(*args, **kwargs):
        calls[0] += 1
        if calls[0] in (3, 4):  # a parameter copy, then the undo's
            raise Injected("out of memory (injected)")
        return original(*args, **kwargs)

    torch.Tensor.copy_ = fails_twice
    try:
        with pytest.raises(RuntimeError, match=r"the task switch failed \(Injected: out of memory \(injected\)\), and "
                                               r"undoing what it had changed failed too .*the model is left partly "
                                               r"changed") as raised:
            nv.load_adapter(model, tasks / "b")
    finally:
        torch.Tensor.copy_ = original
    assert isinstance(raised.value.__cause__, Injected)


def test_a_ctrl_c_at_any_line_of_an_unload_leaves_it_done(tasks, images):
    """Interrupted between deleting a layer's taken-over activation and setting it to None, an unload could be neither
    run again ("no attribute 'input_activation'") nor served."""
    plain = outputs(tiny_vit(), images)
    code = nv.AdaptedLinear.give_back_activation.__code__
    reached = 0
    for line in body_lines(code):
        model = nv.load_adapter(tiny_vit(), tasks / "a")
        if not interrupted_at(code, line, functools.partial(nv.unload, model)):
            continue  # a line no layer of this model reaches
        reached += 1
        assert not nv.adapted_layers(model), line
        torch.testing.assert_close(outputs(model, images), plain, rtol=0, atol=0, msg=str(line))
    assert reached > 5


def test_a_ctrl_c_at_any_line_of_a_merge_and_unload_leaves_it_done_and_recorded(tasks, images):
    """Between removing the adapters and recording what was folded in, a Ctrl-C lost the record: the same adapter
    loaded again was then refused only by the frozen-weights check, not as folded in."""
    from nola_vision.core import inject
    from nola_vision.core.fingerprint import merged_adapters

    done = nv.merge_and_unload(nv.load_adapter(tiny_vit(), tasks / "a"))
    code = inject.merge_and_unload.__wrapped__.__code__  # the body, not the lock around it
    for line in body_lines(code):
        model = nv.load_adapter(tiny_vit(), tasks / "a")
        interrupted_at(code, line, functools.partial(nv.merge_and_unload, model))
        if nv.adapted_layers(model):  # stopped before anything changed (its checks, or the merge, undone)
            continue
        assert len(merged_adapters(model)) == 1, line
        torch.testing.assert_close(outputs(model, images), outputs(done, images), rtol=0, atol=0, msg=str(line))


def test_a_first_load_interrupted_or_failing_leaves_the_model_plain_or_wholly_the_task(tasks, images):
    # inject and the copy of the trained values were two blocks: a Ctrl-C in inject (held to its end) or an error in
    # the copy left fresh untrained adapters, which save_adapter then wrote as a task
    plain, task = outputs(tiny_vit(), images), outputs(nv.load_adapter(tiny_vit(), tasks / "a"), images)
    from nola_vision.core.inject import inject

    code, reached = inject.__code__, 0
    for line in body_lines(code)[::3]:
        model = tiny_vit()
        if interrupted_at(code, line, functools.partial(nv.load_adapter, model, tasks / "a")):
            reached += 1
            torch.testing.assert_close(outputs(model, images), task, rtol=0, atol=0, msg=str(line))
    assert reached > 5
    for call in (1, 3):
        model = tiny_vit()
        with failing(torch.Tensor, "copy_", call), pytest.raises(Injected):
            nv.load_adapter(model, tasks / "a")
        assert not nv.adapted_layers(model)
        torch.testing.assert_close(outputs(model, images), plain, rtol=0, atol=0)


def test_set_quantization_aware_interrupted_or_failing_leaves_every_part_at_one_setting(tasks, images):
    # a Ctrl-C in its per-layer loop left layers at 4 and 8 bits with the model reporting 8, or the head without its
    # hooks: save_adapter accepted either, and the file loaded back with other outputs than the model gave
    from nola_vision.core import inject

    at = {bits: outputs(nv.set_quantization_aware(nv.load_adapter(tiny_vit(), tasks / "a"), bits), images)
          for bits in (4, 8)}
    code = inject.set_quantization_aware.__wrapped__.__code__
    for line in body_lines(code):
        model = nv.set_quantization_aware(nv.load_adapter(tiny_vit(), tasks / "a"), 4)
        interrupted_at(code, line, functools.partial(nv.set_quantization_aware, model, 8))
        bits = inject.quantization_aware_bits(model)
        assert {layer.quant_bits for layer in nv.adapted_layers(model).values()} == {bits}, line
        torch.testing.assert_close(outputs(model, images), at[bits], rtol=0, atol=0, msg=str(line))
    model = nv.set_quantization_aware(nv.load_adapter(tiny_vit(), tasks / "a"), 4)
    with failing(torch.nn.Module, "register_forward_hook", 1), pytest.raises(Injected):
        nv.set_quantization_aware(model, 8)  # the head's hook
    assert inject.quantization_aware_bits(model) == 4
    torch.testing.assert_close(outputs(model, images), at[4], rtol=0, atol=0)


def test_a_ctrl_c_in_the_unmerge_of_an_unload_is_held_until_the_unload_is_done(tasks, images):
    # unmerge's own hold delivered the Ctrl-C before the adapters were removed: the unload stopped half-way
    from nola_vision.core import merge

    plain = outputs(tiny_vit(), images)
    code, reached = merge.unmerge.__wrapped__.__code__, 0
    for line in body_lines(code):
        model = nv.merge(nv.load_adapter(tiny_vit(), tasks / "a"))
        if interrupted_at(code, line, functools.partial(nv.unload, model)):
            reached += 1
            assert not nv.adapted_layers(model), line
            torch.testing.assert_close(outputs(model, images), plain, rtol=0, atol=1e-6, msg=str(line))
    assert reached > 3


@pytest.mark.parametrize("pair", [("merge", "merge"), ("merge", "load_adapter"), ("unmerge", "load_adapter"),
                                  ("unload", "load_adapter"), ("unmerge through a wrapper", "load_adapter")])
def test_merges_unmerges_and_unloads_take_turns_with_each_other_and_task_switches(tasks, images, pair, monkeypatch):
    # only switches took the model's lock: two merges (or a merge, unmerge or unload beside a switch) interleaved
    # their writes of the frozen weights, which stayed off after unload (0.04 to 0.06), or left a model matching
    # neither task; so did one through a wrapper (nn.Sequential(model)), whose lock was its own. Each layer's write
    # waits a moment here, so that unserialised threads always interleave.
    import threading
    import time

    for name in ("merge", "unmerge"):
        write = getattr(nv.AdaptedLinear, name)
        monkeypatch.setattr(nv.AdaptedLinear, name, functools.partialmethod(_after_a_moment, write, time.sleep))
    merged_a = outputs(nv.merge(nv.load_adapter(tiny_vit(), tasks / "a")), images)
    for _ in range(2):
        model = nv.load_adapter(tiny_vit(), tasks / "a")
        if pair[0] != "merge":
            nv.merge(model)
        errors = []
        actions = {"merge": (nv.merge, model), "unmerge": (nv.unmerge, model), "unload": (nv.unload, model),
                   "unmerge through a wrapper": (nv.unmerge, torch.nn.Sequential(model)),
                   "load_adapter": (nv.load_adapter, model, tasks / "b")}
        threads = [threading.Thread(target=_recording, args=(actions[name][0], errors, *actions[name][1:]))
                   for name in pair]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(isinstance(error, (ValueError, nv.AdapterLoadError)) for error in errors), errors
        if pair == ("merge", "merge"):
            torch.testing.assert_close(outputs(model, images), merged_a, rtol=0, atol=1e-5)
        if nv.adapted_layers(model):
            assert_base_weights_back(model, torch.float32)
        else:
            torch.testing.assert_close(outputs(model, images), outputs(tiny_vit(), images), rtol=0, atol=1e-5)


def _after_a_moment(layer, write, sleep, *args, **kwargs):
    sleep(0.002)  # another thread runs meanwhile
    return write(layer, *args, **kwargs)


def _recording(action, errors, *args):
    """``action(*args)``, its exception appended to ``errors`` (a refusal, the model unloaded meanwhile, is fine)."""
    try:
        action(*args)
    except Exception as error:
        errors.append(error)


@pytest.mark.parametrize("action", ["unload", "merge_and_unload"])
def test_an_unload_that_fails_giving_a_layer_back_says_so_and_runs_again_to_the_end(tasks, images, action):
    # a user's module hook raising on the third layer put back: some layers given back (holding W + ΔW after
    # merge_and_unload) and others still adapted, with nothing saying so; forward then blamed the architecture
    from torch.nn.modules.module import register_module_module_registration_hook

    done = outputs(getattr(nv, action)(nv.load_adapter(tiny_vit(), tasks / "a")), images)
    model, calls = nv.load_adapter(tiny_vit(), tasks / "a"), []

    def failing_hook(module, name, submodule):
        calls.append(name)
        if len(calls) == 3:
            raise Injected("a user's registration hook failed")

    handle = register_module_module_registration_hook(failing_hook)
    try:
        with pytest.raises(RuntimeError, match=rf"nv.{action} failed giving back .* after \d+ of \d+ adapted layers "
                           rf"were given back: the model is left partly unloaded. .*call nv.{action}\(model\) again"):
            getattr(nv, action)(model)
    finally:
        handle.remove()
    getattr(nv, action)(model)
    assert not nv.adapted_layers(model)
    torch.testing.assert_close(outputs(model, images), done, rtol=0, atol=0)
