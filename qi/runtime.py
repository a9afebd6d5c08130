"""Process settings qi applies to the processes it owns (the ``qi`` command, a served model).

glibc's malloc hands large freed blocks straight back to the operating system: every forward
pass of a convolutional network then maps fresh pages for its activations and faults them in
again, and on a 2-core machine more time went to the kernel than to the network (EfficientNet-
Lite0 at 224 px, batch 64: 23 images/s with 14 s of system time per 256 images; 66 images/s
and no system time with the thresholds below). Raising the trim and mmap thresholds keeps freed
memory in the process for the next batch. The price: the process keeps its peak memory until
it exits. Library users who import qi keep their allocator as it is unless they call
:func:`keep_freed_memory` themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
_LARGEST = 2**31 - 1


def keep_freed_memory() -> bool:
    """Stop glibc from returning freed memory to the OS; False where there is no glibc or
    ``QI_KEEP_MALLOC=1`` asks to leave the allocator alone."""
    if os.environ.get("QI_KEEP_MALLOC") == "1":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return False
    done = all(
        mallopt(ctypes.c_int(option), ctypes.c_int(_LARGEST)) == 1
        for option in (M_TRIM_THRESHOLD, M_MMAP_THRESHOLD)
    )
    log.debug("glibc malloc thresholds raised: %s", done)
    return done
