"""engine/host_memory.py: freed host memory is returned once per newly compiled program, not
after every call (each trim walks the heap)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from engine.host_memory import ProgramWatch, return_freed_memory


def test_watch_trims_only_after_a_new_program():
    f, g = jax.jit(lambda x: x + 1), jax.jit(lambda x: x * 2)
    watch = ProgramWatch(f, g)
    assert not watch.after_call()  # nothing compiled yet
    f(jnp.ones(3))
    assert watch.after_call()
    f(jnp.ones(3))
    assert not watch.after_call()  # the same program again
    g(jnp.ones(3))
    f(jnp.ones(4))
    assert watch.after_call() and not watch.after_call()
    return_freed_memory()  # callable on its own (a no-op without glibc)
