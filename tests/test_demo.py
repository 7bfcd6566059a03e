"""The demo: its code path with a tiny random backbone (fast, offline), and the real offline demo (slow)."""
import re
import time

import pytest

from nola_vision.demo import format_table, main, run_demo

TINY = dict(backbone="vit_tiny_patch16_224", pretrained=False, image_size=32,
            backbone_kwargs=dict(patch_size=8, depth=2, embed_dim=64, num_heads=2))


def test_demo_code_path_reports_exact_counts_and_adapter_sizes(tmp_path):
    results = run_demo(**TINY, shots=2, epochs=1, num_basis=32, out=str(tmp_path), progress=False)
    by_method = {r.method: r for r in results}
    assert list(by_method) == ["linear", "lora", "nola"]
    assert by_method["linear"].adapter_params == 0
    assert by_method["lora"].adapter_params == 2 * 2 * (64 * 4 + 4 * 64)  # 2 blocks x (q, v) x (A + B)
    assert by_method["nola"].adapter_params == 2 * 2 * (32 + 32)  # 2 blocks x (fc1, fc2) x (k + l)
    assert {r.head_params for r in results} == {64 * 10 + 10}
    for r in results:
        assert 0.0 <= r.test_acc <= 1.0
        assert (tmp_path / r.method / "adapter_model.safetensors").is_file()
    assert by_method["nola"].adapter_bytes_4bit < by_method["nola"].adapter_bytes
    table = format_table(results)
    assert "| nola (NOLA r=4 k=l=32 on mlp.fc1+mlp.fc2) | 256 | 650 |" in table


def test_demo_command_prints_the_table(tmp_path, capsys):
    code = main(["--backbone", "vit_tiny_patch16_224", "--no_pretrained", "--image_size", "32", "--backbone_kwargs",
                 '{"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}', "--shots", "1", "--epochs", "1",
                 "--methods", "nola", "--num_basis", "16", "--out", str(tmp_path), "--no_progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert re.search(r"\| nola \(NOLA r=4 k=l=16 on mlp.fc1\+mlp.fc2\) \| 128 \| 650 \| \d+\.\d% \|", out)


def test_demo_rejects_unknown_backbones_with_close_matches(capsys):
    assert main(["--backbone", "vit_tiny_patch16_22", "--no_progress"]) == 1
    assert "vit_tiny_patch16_224" in capsys.readouterr().err


@pytest.mark.slow
def test_full_offline_demo_beats_chance_within_ten_minutes(tmp_path):
    start = time.time()
    results = run_demo(out=str(tmp_path), progress=False)
    assert time.time() - start < 600
    by_method = {r.method: r for r in results}
    assert by_method["nola"].adapter_params == 49_152 and by_method["lora"].adapter_params == 73_728
    assert all(r.test_acc > 0.5 for r in results)  # 10 classes: chance is 10%
