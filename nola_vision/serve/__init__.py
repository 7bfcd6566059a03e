"""Serving many tasks on one frozen backbone, built on the public functions of ``adapters`` and ``core``."""
from .multitask import MultiTaskModel

__all__ = ["MultiTaskModel"]
