"""Lightning DDP works unchanged: two CPU processes see the same k-shot split and end with identical coefficients."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_ranks_share_the_split_and_end_with_identical_coefficients(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "nola_vision.cli", "fit", "-c", str(ROOT / "configs" / "tiny_offline.yaml"),
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", "--result_file", str(tmp_path / "result.json"),
           "--trainer.default_root_dir", str(tmp_path), "--data.shots", "8",
           "--trainer.callbacks+=ddp_probe.RankDump", f"--trainer.callbacks.out={tmp_path / 'dump'}"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [d["world_size"] for d in ranks] == [2, 2]
    assert ranks[0]["manifest"] == ranks[1]["manifest"] and len(ranks[0]["manifest"]) == 80
    # 80 images, batch 16, 2 ranks: 40 per rank, 2 full batches per epoch, 2 epochs
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4
    assert ranks[0]["trained"].keys() == ranks[1]["trained"].keys()
    for key, value in ranks[0]["trained"].items():
        torch.testing.assert_close(ranks[1]["trained"][key], value, rtol=0, atol=0)
    initial = torch.full_like(ranks[0]["trained"]["model.blocks.0.mlp.fc1.nola_alpha"], 1 / 64)
    assert not torch.equal(ranks[0]["trained"]["model.blocks.0.mlp.fc1.nola_alpha"], initial)  # it trained
    assert (tmp_path / "result.json").is_file()  # written by rank 0 after the distributed test pass
    # digits' 899 test images, each counted once: Lightning's padded sampler gave both ranks 450 (one image twice)
    correct = json.loads((tmp_path / "result.json").read_text())["metrics"]["test/acc"] * 899
    assert abs(correct - round(correct)) < 1e-4
    # rank 0 alone exported the adapter
    assert len(list(tmp_path.rglob("adapter_model.safetensors"))) == 1
    # predict with its default file: rank 0 asked the log folder (a collective) after rank 1 had left, and failed
    run_dir = next(tmp_path.rglob("checkpoints")).parent
    predict = [sys.executable, "-m", "nola_vision.cli", "predict", "-c", str(run_dir / "config.yaml"), "--ckpt_path",
               str(run_dir / "checkpoints" / "last.ckpt"), "--trainer.devices", "2", "--trainer.strategy", "ddp",
               "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "predicted"),
               # 450 images a rank, 2 batches of 256: a limit of 2 covers the split (refused as 2 of its 4 batches)
               "--data.eval_batch_size", "256", "--trainer.limit_predict_batches", "2"]
    run = subprocess.run(predict, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = next((tmp_path / "predicted").rglob("predictions.csv")).read_text().splitlines()
    assert len(rows) == 1 + 899  # a header, then every test image once
