"""A callback for test_ddp.py: each rank saves its k-shot manifest and trained tensors at the end of fit."""
from pathlib import Path

import torch
from lightning.pytorch import Callback


class RankDump(Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save({"rank": trainer.global_rank, "world_size": trainer.world_size,
                    "manifest": trainer.datamodule.train_manifest,
                    "trained": {k: v.detach().cpu().clone() for k, v in pl_module.trained_state_dict().items()},
                    "steps": trainer.global_step},
                   self.out / f"rank{trainer.global_rank}.pt")
