"""Telling a device fault from an ordinary failure, by the error alone (a pure function).

After some CUDA errors the context is unusable: a device-side assert, an illegal memory
access or a launch failure is sticky, and every later call on that device fails too, for
every model on it, until the process lets go of the context. Such an error says nothing
about the request that hit it (it may even surface in another request's step, at the next
synchronisation), so the right response is to stop serving from that device and say why,
not to fail one request and carry on. Running out of memory is not one of them: the
allocator recovers and the next request can run.
"""

from __future__ import annotations

# Message fragments of the CUDA runtime's, cuBLAS' and NCCL's sticky errors as torch words them.
STICKY_MARKERS = (
    "device-side assert",
    "illegal memory access",
    "illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "launch timed out",
    "uncorrectable ECC error",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "CUBLAS_STATUS_INTERNAL_ERROR",
    "NCCL error",
)
# Any other "CUDA error: ..." is treated as sticky too (the runtime does not say which are
# not), except memory exhaustion.
CUDA_ERROR = "CUDA error"
NOT_STICKY = ("out of memory",)


def device_fault(exc: BaseException) -> str | None:
    """The reason to poison the device when `exc` (or what caused it) is a sticky device
    error, else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        message = str(current)
        lowered = message.lower()
        if type(current).__name__ == "OutOfMemoryError" or any(m in lowered for m in NOT_STICKY):
            return None
        if CUDA_ERROR in message or any(marker.lower() in lowered for marker in STICKY_MARKERS):
            first_line = message.strip().splitlines()[0] if message.strip() else type(current).__name__
            return f"{type(current).__name__}: {first_line}"
        current = current.__cause__ or current.__context__
    return None
