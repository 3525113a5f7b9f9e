from __future__ import annotations

import ctypes
import ctypes.util
import gc
import warnings
from collections.abc import Iterator

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _give_memory_back(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test over large models, free what it left and hand the heap back to the OS.

    glibc keeps freed blocks below its mmap threshold (weights of up to 32 MB) in its heap, so
    one multi-GB model after another grows the process far past what any single test needs
    (13 GB instead of 6 GB over the corpus). ``malloc_trim`` returns that memory.
    """
    yield
    if request.node.get_closest_marker("corpus") is not None:
        gc.collect()
        if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
            _LIBC.malloc_trim(0)


@pytest.fixture(autouse=True, scope="session")
def _own_profile_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Device profiles made by the tests go to a folder of the run's, not the user's cache."""
    import os

    previous = os.environ.get("SLIMFX_CACHE_DIR")
    os.environ["SLIMFX_CACHE_DIR"] = str(tmp_path_factory.mktemp("slimfx-cache"))
    yield
    if previous is None:
        os.environ.pop("SLIMFX_CACHE_DIR", None)
    else:
        os.environ["SLIMFX_CACHE_DIR"] = previous
