"""peftkern's Triton kernels, installed as ``peftkern.triton_kernels``.

Each module holds the ``@triton.jit`` kernels of one op and plain launchers that take checked tensors.
Imports triton and torch only, so a serving stack can vendor this folder alone.
"""
