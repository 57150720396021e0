"""Host memory that a process has freed, given back to the OS.

glibc's malloc keeps freed heap memory mapped, and a JAX process frees a lot of it in bursts:
the loader's float32 temporaries, and the lowering and loading of every compiled program
(~100-250 MB of resident memory each for the embedded model's programs on CPU, measured with
`malloc_trim` after each). Peak resident memory is what a worker's size is chosen by, so the
engine trims once after the weights are placed and after each call that brought in a new
program. Best effort: a no-op where libc is not glibc.
"""

from __future__ import annotations

import ctypes
import functools


@functools.lru_cache(maxsize=1)
def _trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """malloc_trim(0): release the heap's free pages to the OS (milliseconds)."""
    trim = _trim()
    if trim is not None:
        trim(0)


class ProgramWatch:
    """Calls return_freed_memory after a call to any of `jitted` compiled or loaded a new program
    (their cache sizes grew); nothing otherwise."""

    def __init__(self, *jitted):
        self._jitted = jitted
        self._seen = 0

    def after_call(self) -> bool:
        """Whether a new program came in (and memory was returned) since the last call."""
        n = sum(f._cache_size() for f in self._jitted if hasattr(f, "_cache_size"))
        if n == self._seen:
            return False
        self._seen = n
        return_freed_memory()
        return True
