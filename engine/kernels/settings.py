"""The ragged decode kernel's tunable settings and their defaults, importable without JAX.

`EngineConfig.decode_kernel` ("block_t=32,method=dot", say) and benchmarks/decode_attention.py's
grids are parsed here; engine/kernels/ragged_decode.py reads the defaults. The defaults are the
fastest settings of the sweeps in BENCHMARKS.md; num_warps 0 picks the warp count by shape.
"""

from __future__ import annotations

DEFAULTS = dict(block_t=64, method="auto", num_splits=1, num_warps=0, num_stages=2, mask_loads=1,
                convert="prmt", terms=2, heads=1)
CHOICES = {"method": ("auto", "fma", "dot", "mma8", "mma8k", "dp4a"), "convert": ("prmt", "magic", "cvt")}
# Methods whose score dot runs on the tensor cores, with the query rows padded to a 16-row tile.
TENSOR_CORE_METHODS = ("dot", "mma8", "mma8k")


def parse_setting(key: str, val) -> tuple[str, object]:
    """One kernel setting from text: (key, value typed as DEFAULTS holds it); ValueError if bad."""
    key = key.strip()
    if key not in DEFAULTS:
        raise ValueError(f"unknown ragged decode setting {key!r} (known: {', '.join(sorted(DEFAULTS))})")
    if isinstance(DEFAULTS[key], str):
        val = str(val).strip()
        if val not in CHOICES[key]:
            raise ValueError(f"{key} must be one of {', '.join(CHOICES[key])}, got {val!r}")
        return key, val
    try:
        out = int(val)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be an integer, got {val!r}") from None
    if out < 0:
        raise ValueError(f"{key} must be >= 0, got {out}")
    return key, out


def resolve(**explicit) -> dict:
    """DEFAULTS with the explicit (not None) settings over them."""
    out = dict(DEFAULTS)
    out.update({k: v for k, v in explicit.items() if v is not None})
    return out


def warps_for(method: str, g: int, d: int) -> int:
    """Warps per program when not set: the fastest count of the sweep per shape (BENCHMARKS.md,
    decode attention). 2 warps for "dot" up to G=16 and for "fma" with G <= 3 and D <= 128;
    4 otherwise (more query rows or wider heads need the registers)."""
    if method in TENSOR_CORE_METHODS:
        return 2 if g <= 16 else 4
    return 2 if g <= 3 and d <= 128 else 4


def block_for(t: int, want: int, method: str) -> int:
    """The block of tokens a program loads at a time: a power of 2 at most `want` and no bigger
    than T rounded up, and at least the tensor cores' smallest K for the dot methods."""
    bt = 1 << max(0, int(want).bit_length() - 1)  # power of 2 <= want
    bt = min(bt, 1 << (t - 1).bit_length())  # no bigger than T rounded up to a power of 2
    return max(bt, {"dot": 16, "mma8": 32, "mma8k": 32}.get(method, 1))  # the tensor cores' smallest K
