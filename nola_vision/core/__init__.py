"""Adapter machinery on any ``nn.Module``: no Lightning, no files.

One concept per module, bottom up: ``registry`` and ``config`` (methods and their configs), ``basis`` (portable
random bases) and ``quantize`` (the bit widths), ``layer`` (the adapted-layer contract) with ``functions`` (its
autograd functions), ``targets`` (what is adapted and what trains), ``plan``, ``fingerprint`` (which frozen
weights a model has), ``merge``, ``inject`` (and its inverse, ``unload``), ``counts``, ``storage`` (atomic writes),
``interrupts`` (Ctrl-C held off while weights are written) and ``warn`` (warnings that name the user's line).
"""
