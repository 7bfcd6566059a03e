"""Checkpoints written the way the library writes its own files: to a temporary name beside the final one, then
renamed into place (``core.storage.atomic_path``), so a checkpoint under its final name is always whole."""
from __future__ import annotations

import io
from typing import Any, Dict, Optional

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..core.storage import write_bytes_atomic

__all__ = ["LocalAtomicCheckpointIO"]


class LocalAtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local checkpoints are renamed into place from beside their final name.

    Lightning's own writer stages a checkpoint in the system's temporary folder and moves it: where the run folder
    lies on another file system (a local ``/tmp``, runs on NFS or Lustre) the move is a copy onto the final name, so a
    full disk or a kill during it left a checkpoint cut short there, over the previous ``last.ckpt``. Remote paths
    (``s3://``) keep Lightning's writer."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()  # as Lightning's: torch's own file writer reports a full disk with no errno
        torch.save(checkpoint, buffer)
        write_bytes_atomic(path, buffer.getbuffer())
