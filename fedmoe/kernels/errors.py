"""The kernels package's single exception type."""


class KernelError(ValueError):
    """Bad input to a kernel op (shape, dtype, layout), naming expected vs got."""
