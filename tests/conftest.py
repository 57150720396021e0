import os

# Before anything imports jax or gcsfs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# Tests compile from scratch (tests/test_compilation_cache.py turns the persistent cache on itself).
os.environ.setdefault("JETBEAM_COMPILATION_CACHE", "")
