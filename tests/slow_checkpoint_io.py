"""A checkpoint writer that takes its time, as a large checkpoint's write does (``AsyncCheckpointIO`` wraps it)."""
import time

from lightning.pytorch.plugins.io import TorchCheckpointIO


class SlowCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, *args, **kwargs):
        time.sleep(0.5)
        super().save_checkpoint(*args, **kwargs)
