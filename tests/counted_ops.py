"""``CountedOps``: how often each aten op runs under it, to count the kernels a code path would launch."""
import collections

from torch.utils._python_dispatch import TorchDispatchMode


class CountedOps(TorchDispatchMode):
    """Counts the aten ops run under it, by name (``calls["addmm_"]``, ``calls["gelu"]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
