"""The demo: its code path with a tiny random backbone (fast, offline), and the real offline demo (slow)."""
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nola_vision.demo import format_table, main, run_demo

TINY = dict(backbone="vit_tiny_patch16_224", pretrained=False, image_size=32,
            backbone_kwargs=dict(patch_size=8, depth=2, embed_dim=64, num_heads=2))
DIGITS_TEST_IMAGES = 899  # the demo's dataset: scikit-learn's digits, the last 899 images


def test_demo_code_path_reports_exact_counts_and_adapter_sizes(tmp_path):
    results = run_demo(**TINY, shots=2, epochs=1, num_basis=32, seeds=(0, 1), out=str(tmp_path), progress=False)
    by_method = {r.method: r for r in results}
    assert list(by_method) == ["linear", "lora", "nola"]
    assert by_method["linear"].adapter_params == 0
    assert by_method["lora"].adapter_params == 2 * 2 * (64 * 4 + 4 * 64)  # 2 blocks x (q, v) x (A + B)
    assert by_method["nola"].adapter_params == 2 * 2 * (32 + 32)  # 2 blocks x (fc1, fc2) x (k + l)
    assert {r.head_params for r in results} == {64 * 10 + 10}
    for r in results:
        correct = [a * DIGITS_TEST_IMAGES for a in r.test_accs]  # an accuracy counts whole images of the test split
        assert len(correct) == 2 and all(abs(c - round(c)) < 1e-3 and 0 <= round(c) <= DIGITS_TEST_IMAGES
                                         for c in correct)
        assert r.test_acc == pytest.approx(sum(r.test_accs) / 2)
        assert [Path(d) for d in r.adapter_dirs] == [tmp_path / r.method / "seed0", tmp_path / r.method / "seed1"]
        assert all((Path(d) / "adapter_model.safetensors").is_file() for d in r.adapter_dirs)
    assert by_method["nola"].adapter_bytes_4bit < by_method["nola"].adapter_bytes
    table = format_table(results)
    nola = by_method["nola"]
    per_seed = " / ".join(f"{100 * a:.1f}" for a in nola.test_accs)
    assert (f"| nola (NOLA r=4 k=l=32 on mlp.fc1+mlp.fc2) | 256 | 650 | {100 * nola.test_acc:.1f} ± "
            f"{100 * nola.test_std:.1f}% | {per_seed} |") in table


def test_demo_needs_a_split_seed(tmp_path):
    with pytest.raises(ValueError, match="at least one split seed"):
        run_demo(**TINY, seeds=(), out=str(tmp_path), progress=False)
    for seed in (-1, 2**32):  # numpy's bounds error, which named no option
        with pytest.raises(ValueError, match=rf"--seeds must be integers from 0 to 4294967295 .*got \[{seed}\]"):
            run_demo(**TINY, seeds=(seed,), out=str(tmp_path), progress=False)


def test_a_file_where_a_later_runs_folder_goes_is_refused_before_any_run_trains(tmp_path, capsys):
    # the linear and LoRA runs trained, then lora/4bit was refused and every finished result lost
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "4bit").write_text("notes\n")
    start = time.time()
    code = main([*TINY_ARGS[:-6], "--methods", "linear", "lora", "--seeds", "0", "--out", str(tmp_path),
                 "--no_progress"])
    assert code == 1 and "lora/4bit is an existing file" in capsys.readouterr().err
    assert not (tmp_path / "linear").exists() and time.time() - start < 30


def test_demo_errors_name_the_demos_options(tmp_path, capsys):
    # refused as usage errors (exit 2, as argparse's own), not as a failed run (exit 1)
    for option, value in (("--shots", "-3"), ("--rank", "0"), ("--num_basis", "0"), ("--lr", "0"), ("--lr", "nan"),
                          ("--epochs", "0"), ("--batch_size", "0")):
        with pytest.raises(SystemExit) as stop:
            main([*TINY_ARGS, option, value, "--out", str(tmp_path), "--no_progress"])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"argument {option}: " in err and "FewShot" not in err, (option, err)


def test_full_fine_tuning_counts_every_weight_it_trains(tmp_path):
    # the table said 0 trained parameters beside the head, as if full fine-tuning trained less than NOLA
    (full,) = run_demo(**TINY, shots=1, epochs=1, seeds=(0,), methods=("full",), out=str(tmp_path), progress=False)
    import timm

    backbone = timm.create_model(TINY["backbone"], pretrained=False, num_classes=10, img_size=32,
                                 **TINY["backbone_kwargs"])
    assert full.adapter_params == sum(p.numel() for p in backbone.parameters()) - full.head_params > 0


def test_demo_command_prints_the_table(tmp_path, capsys):
    code = main(["--backbone", "vit_tiny_patch16_224", "--no_pretrained", "--image_size", "32", "--backbone_kwargs",
                 '{"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}', "--shots", "1", "--epochs", "1",
                 "--methods", "nola", "--num_basis", "16", "--seeds", "3", "--out", str(tmp_path), "--no_progress"])
    assert code == 0
    out = capsys.readouterr().out
    row = r"\| nola \(NOLA r=4 k=l=16 on mlp.fc1\+mlp.fc2\) \| 128 \| 650 \| \d+\.\d% \| \d+\.\d \|"  # one seed: no sd
    assert re.search(row, out)
    assert "split seeds [3]" in out and (tmp_path / "nola" / "seed3" / "adapter_model.safetensors").is_file()


TINY_ARGS = ["--backbone", "vit_tiny_patch16_224", "--no_pretrained", "--image_size", "32", "--backbone_kwargs",
             '{"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}', "--shots", "1", "--epochs", "1",
             "--methods", "nola", "--num_basis", "16", "--seeds", "0"]
LIGHTNING_NOISE = ("GPU available", "TPU available", "Tip", "LeafSpec", "Total length of", "Trainer.fit` stopped",
                   "Epoch 0", "Testing")


def _demo_output(tmp_path, *extra):
    done = subprocess.run([sys.executable, "-m", "nola_vision.cli", "demo", *TINY_ARGS, "--out", str(tmp_path), *extra],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def test_the_demo_screen_shows_one_progress_bar_its_own_lines_and_the_table_without_lightning_banners(tmp_path):
    out, err = _demo_output(tmp_path)
    own = [line for line in out.splitlines() if line.startswith(("==", "   nola"))]
    assert own[0] == "== nola: NOLA r=4 k=l=16 on mlp.fc1+mlp.fc2, split seeds [0] =="
    assert len(own) == 2 and re.fullmatch(r"   nola, split seed 0: test accuracy \d+\.\d%", own[1])
    assert "| nola (NOLA r=4 k=l=16 on mlp.fc1+mlp.fc2) | 128 | 650 |" in out
    assert "demo: 100%" in err and "1/1" in err  # one bar over method x seed
    assert [noise for noise in LIGHTNING_NOISE if noise in out + err] == []


def test_demo_verbose_keeps_lightnings_own_output(tmp_path):
    out, err = _demo_output(tmp_path, "--verbose")
    assert "GPU available" in out + err and "demo: " not in err


def test_demo_rejects_unknown_backbones_with_close_matches(capsys):
    assert main(["--backbone", "vit_tiny_patch16_22", "--no_progress"]) == 1
    assert "vit_tiny_patch16_224" in capsys.readouterr().err


FAILING_DEMO = ["--backbone", "vit_tiny_patch16_224", "--no_pretrained", "--image_size", "32", "--backbone_kwargs",
             '{"depth": 1, "embed_dim": 32, "num_heads": 2}', "--epochs", "1", "--seeds", "0", "--methods", "linear",
             "--no_progress"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_an_accelerator_this_machine_lacks_is_one_line_error(tmp_path, capsys):
    """Lightning's MisconfigurationException (and the ImportError of a TPU without XLA) ended in a traceback."""
    assert main([*FAILING_DEMO, "--accelerator", "gpu", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nola-vision demo: error: No supported gpu backend found") and "Traceback" not in err


def test_more_shots_than_a_class_has_names_the_demos_own_fix(tmp_path, capsys):
    """The data layer's advice, --data.allow_fewer true, is no option of the demo's."""
    assert main([*FAILING_DEMO, "--shots", "1000", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "a 1000-shot split needs 1000 per class. Lower --shots" in err and "allow_fewer true" not in err


@pytest.mark.slow
def test_full_offline_demo_beats_chance_within_ten_minutes(tmp_path):
    start = time.time()
    results = run_demo(out=str(tmp_path), progress=False)
    assert time.time() - start < 600
    by_method = {r.method: r for r in results}
    assert by_method["nola"].adapter_params == 49_152 and by_method["lora"].adapter_params == 73_728
    assert all(len(r.test_accs) == 3 and min(r.test_accs) > 0.5 for r in results)  # 10 classes: chance is 10%


def test_the_demo_module_runs_as_a_script():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "nola_vision.demo", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--shots" in done.stdout  # it did nothing and exited 0 before


def test_the_demos_warnings_name_its_own_options_once(tmp_path):
    # the module's advice named the CLI's --model.lr and trainer.max_epochs, once per split seed
    _, err = _demo_output(tmp_path, "--epochs", "2", "--seeds", "0", "1")
    assert err.count("a run of --epochs 2 has no room for one") == 1 and "pass a lower --lr" in err
    assert "--model.lr" not in err and "trainer.max_epochs" not in err


def test_the_demos_warnings_come_without_the_librarys_source_line(tmp_path):
    # a second run into one --out warned of the adapter it replaced, followed by the call that warned, f-string and all
    _demo_output(tmp_path, "--epochs", "3")
    _, err = _demo_output(tmp_path, "--epochs", "3")
    assert "already held an adapter" in err
    assert not [line for line in err.splitlines() if line.lstrip().startswith(("warn_user(", "rank_zero_warn("))]


def test_the_demos_messages_name_its_own_out_and_no_pretrained_options():
    # the reused-folder warning said "--model.adapter_dir", a missing download "model.pretrained false": neither is
    # an option of the demo
    from nola_vision.demo import _in_demo_terms

    assert _in_demo_terms("give each run its own --model.adapter_dir to keep them all") == \
        "give each run its own --out to keep them all"
    assert _in_demo_terms("or train from random weights with model.pretrained false") == \
        "or train from random weights with --no_pretrained"


def test_a_cache_folder_that_cannot_be_made_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    # a 46-line traceback that ended in the fix
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("NOLA_VISION_CACHE", str(tmp_path / "a file" / "cache"))
    assert main(["--seeds", "0", "--epochs", "1", "--methods", "linear", "--out", str(tmp_path / "out"),
                 "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nola-vision demo: error: nola_vision's cache folder") and "Traceback" not in err
    assert "point NOLA_VISION_CACHE at a folder this user can write" in err


def test_the_demos_4_bit_copy_warns_in_one_line_not_one_per_tensor(tmp_path):
    import nola_vision as nv
    from nola_vision.demo import _save_four_bit_copy

    model = nv.inject(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)),
                      nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8, targets=["0", "1"]))
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith(("nola_alpha", "nola_beta")):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(0)))
                tensor[0, 0] = 1e4  # an outlier sets the range of the 16 codes: the others all on one
    with pytest.warns(UserWarning) as caught:
        _save_four_bit_copy(model, tmp_path / "4bit")
    messages = [str(w.message) for w in caught]
    assert messages == [f"nola_vision: the 4-bit copy {tmp_path / '4bit'} loses most of the values of 4 tensors (the "
                        "run did not train for 4 bits): it measures the size; for a 4-bit adapter that keeps its "
                        "accuracy, train quantisation-aware (FewShotClassifier(quant_bits=4), --model.quant_bits 4)"]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is a POSIX signal")
def test_a_demo_stopped_by_sigterm_says_so_and_exits_143(tmp_path):
    # Lightning's SIGTERMException is a SystemExit without a code: the stopped demo exited 0, printing nothing
    import signal

    args = [a if a != "1" or i != TINY_ARGS.index("--epochs") + 1 else "500" for i, a in enumerate(TINY_ARGS)]
    demo = subprocess.Popen([sys.executable, "-m", "nola_vision.cli", "demo", *args, "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in demo.stdout:  # the run's header: its Trainer (and Lightning's SIGTERM handler) comes next
        if line.startswith("== nola"):
            break
    time.sleep(3)
    demo.send_signal(signal.SIGTERM)
    _, err = demo.communicate(timeout=120)
    assert demo.returncode == 143 and "nola-vision demo: stopped by SIGTERM" in err, err[-2000:]


def test_an_allocation_that_fails_names_the_options_that_size_it(monkeypatch, capsys):
    # torch's CPU allocator raises a RuntimeError ("[enforce fail at alloc_cpu.cpp] ... can't allocate memory"), which
    # the demo printed as it was, naming none of its options
    import nola_vision.demo as demo

    def too_large(**kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(demo, "run_demo", too_large)
    assert main(["--out", "unused"]) == 1
    err = capsys.readouterr().err
    assert "out of memory ([enforce fail" in err and "lower --rank, --num_basis, --image_size or --batch_size" in err


def test_a_demo_stopped_by_ctrl_c_leaves_sigint_as_it_found_it(tmp_path, monkeypatch, capsys):
    """Lightning ignores SIGINT for its shutdown after a Ctrl-C in Trainer.fit and never restores it: a second demo
    in the process could no longer be interrupted."""
    import signal

    from nola_vision.train.module import FewShotClassifier

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(FewShotClassifier, "training_step", interrupted)
    assert main([*TINY_ARGS, "--out", str(tmp_path), "--no_progress"]) == 130
    assert "interrupted (Ctrl-C, SIGINT)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before
