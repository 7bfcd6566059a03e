"""Serving many tasks on one frozen backbone, built on the public functions of ``adapters`` and ``core``: mixed-task
batches in PyTorch (``MultiTaskModel``) and ONNX graphs, merged or with the task as inputs (``export_onnx``)."""
from .multitask import MultiTaskModel
from .onnx import export_onnx, onnx_task_inputs

__all__ = ["MultiTaskModel", "export_onnx", "onnx_task_inputs"]
