"""The optional compiled kernels (`ctrpipe/_native.c`), or None.

None when the extension was not built (no C compiler at install time) or when the environment sets
`CTRPIPE_NATIVE=0`; callers then take their polars / numpy / torch path. The shard build gives the same
bytes either way (tests build a cache both ways and compare); LazyAdam's CPU step agrees to float rounding.
"""

from __future__ import annotations

import os
from types import ModuleType

try:
    from ctrpipe import _native as _module
except ImportError:          # built without a compiler: the pure-Python path is used
    _module = None


def native() -> ModuleType | None:
    """The compiled module, unless it is missing or switched off with CTRPIPE_NATIVE=0."""
    if _module is None or os.environ.get("CTRPIPE_NATIVE", "1") == "0":
        return None
    return _module


def native_built() -> bool:
    """Whether the extension is importable at all (whatever CTRPIPE_NATIVE says)."""
    return _module is not None
