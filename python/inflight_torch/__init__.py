"""inflight as PyTorch's CUDA allocator.

``inflight_torch.enable()`` plugs ``libinflight_torch.so`` (built with
``cargo build --release -p inflight-torch``) into PyTorch through
``torch.cuda.memory.CUDAPluggableAllocator``: every CUDA tensor's memory then
comes from inflight's stream-ordered queues, which never reuse or release a
block that work on some stream may still use. Call it before anything
allocates CUDA memory (before CUDA is initialised)::

    import inflight_torch
    inflight_torch.enable()              # policy="deferred"
    import torch
    x = torch.randn(1024, 1024, device="cuda")
    print(inflight_torch.memory_stats())

PyTorch's own ``torch.cuda.memory_stats`` (and ``max_memory_reserved``,
``reset_peak_memory_stats``...) raise "not supported" once a pluggable
allocator is in place; :func:`memory_stats`, :func:`max_memory_reserved`,
:func:`max_memory_allocated`, :func:`reset_peak_memory_stats` and
:func:`empty_cache` here give the same figures from inflight.

The library is found (first that exists): the ``library`` argument, the
``INFLIGHT_TORCH_LIB`` environment variable, ``libinflight_torch.so`` next
to this package, ``target/release/libinflight_torch.so`` in the repository
this package sits in, then in the current directory.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

__all__ = [
    "enable",
    "enabled",
    "configure",
    "load",
    "library_path",
    "backend",
    "memory_stats",
    "memory_allocated",
    "memory_reserved",
    "max_memory_allocated",
    "max_memory_reserved",
    "reset_peak_memory_stats",
    "empty_cache",
    "InflightTorchError",
]

__version__ = "0.1.0"

#: The C ABI version this package speaks (``inflight_torch_abi_version``).
ABI_VERSION = 1

_LIB_NAME = "libinflight_torch.so"
_POLICIES = ("deferred", "retained", "immediate")
_BACKENDS = ("cuda", "sim")

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_path: Optional[str] = None
_enabled: Optional[Dict[str, Any]] = None
_allocator: Any = None  # keeps PyTorch's allocator object alive


class InflightTorchError(RuntimeError):
    """The library could not be found, loaded, configured or plugged in."""


class _Stats(ctypes.Structure):
    # The C struct inflight_torch_stats, in its order (fields are only ever
    # added at the end; the library writes at most sizeof of this).
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "allocated_bytes",
            "peak_allocated_bytes",
            "reserved_bytes",
            "peak_reserved_bytes",
            "cached_ready_bytes",
            "cached_pending_bytes",
            "active_count",
            "allocations",
            "frees",
            "cache_hits",
            "device_allocations",
            "device_releases",
            "device_alloc_failures",
            "oom_errors",
            "deferred_frees",
            "waits",
            "streams",
        )
    ]


def _candidates(library: Optional[str]):
    if library:
        yield Path(library)
        return
    env = os.environ.get("INFLIGHT_TORCH_LIB")
    if env:
        yield Path(env)
        return
    here = Path(__file__).resolve().parent
    yield here / _LIB_NAME
    # python/inflight_torch/__init__.py -> the repository's root.
    yield here.parent.parent / "target" / "release" / _LIB_NAME
    yield Path.cwd() / "target" / "release" / _LIB_NAME


def _find(library: Optional[str]) -> str:
    tried = []
    for p in _candidates(library):
        tried.append(str(p))
        if p.is_file():
            return str(p)
    raise InflightTorchError(
        f"{_LIB_NAME} not found (tried: {', '.join(tried)}); build it with "
        "`cargo build --release -p inflight-torch`, or pass library=... or set INFLIGHT_TORCH_LIB"
    )


def _declare(lib: ctypes.CDLL) -> None:
    c = ctypes
    lib.inflight_torch_abi_version.restype = c.c_uint32
    lib.inflight_torch_abi_version.argtypes = []
    lib.inflight_torch_malloc.restype = c.c_void_p
    lib.inflight_torch_malloc.argtypes = [c.c_ssize_t, c.c_int, c.c_void_p]
    lib.inflight_torch_free.restype = None
    lib.inflight_torch_free.argtypes = [c.c_void_p, c.c_ssize_t, c.c_int, c.c_void_p]
    lib.inflight_torch_record_stream.restype = None
    lib.inflight_torch_record_stream.argtypes = [c.c_void_p, c.c_void_p]
    lib.inflight_torch_empty_cache.restype = None
    lib.inflight_torch_empty_cache.argtypes = []
    lib.inflight_torch_init.restype = None
    lib.inflight_torch_init.argtypes = [c.c_int]
    lib.inflight_torch_set_memory_fraction.restype = None
    lib.inflight_torch_set_memory_fraction.argtypes = [c.c_double, c.c_int]
    lib.inflight_torch_configure.restype = c.c_int
    lib.inflight_torch_configure.argtypes = [c.c_char_p, c.c_int64, c.c_int64, c.c_char_p]
    lib.inflight_torch_stats.restype = c.c_int
    lib.inflight_torch_stats.argtypes = [c.c_int, c.POINTER(_Stats), c.c_size_t]
    lib.inflight_torch_reset_peak.restype = None
    lib.inflight_torch_reset_peak.argtypes = [c.c_int]
    lib.inflight_torch_backend.restype = c.c_char_p
    lib.inflight_torch_backend.argtypes = []
    lib.inflight_torch_device_count.restype = c.c_int
    lib.inflight_torch_device_count.argtypes = []
    lib.inflight_torch_live_allocations.restype = c.c_size_t
    lib.inflight_torch_live_allocations.argtypes = [c.c_int]


def load(library: Optional[str] = None) -> ctypes.CDLL:
    """Loads the library (once; later calls return it) and checks its ABI
    version. Needs no PyTorch: with ``INFLIGHT_TORCH_BACKEND=sim``, or after
    :func:`configure` with ``backend="sim"``, it runs on inflight's simulated
    GPU."""
    global _lib, _path
    with _lock:
        if _lib is not None:
            if library and os.path.realpath(library) != os.path.realpath(_path):
                raise InflightTorchError(f"already loaded from {_path}, not {library}")
            return _lib
        path = _find(library)
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            raise InflightTorchError(f"cannot load {path}: {e}") from e
        _declare(lib)
        abi = lib.inflight_torch_abi_version()
        if abi != ABI_VERSION:
            raise InflightTorchError(
                f"{path} speaks C ABI version {abi}; this package speaks {ABI_VERSION}: "
                "rebuild the library and the package from the same commit"
            )
        _lib, _path = lib, path
        return lib


def library_path() -> Optional[str]:
    """The loaded library's path (``None`` before :func:`load`/:func:`enable`)."""
    return _path


def enabled() -> bool:
    """Whether :func:`enable` has plugged inflight into PyTorch."""
    return _enabled is not None


def backend() -> str:
    """``"cuda"``, ``"sim"``, ``"unavailable"``, or ``"none"`` before the
    first allocation (``"not loaded"`` before :func:`load`)."""
    if _lib is None:
        return "not loaded"
    return _lib.inflight_torch_backend().decode()


def _preload_nvrtc() -> None:
    """inflight's CUDA backend opens NVRTC by name at its first device.
    PyTorch's CUDA 13 wheels ship it inside the ``nvidia`` packages, off the
    loader's path: load it from there (globally), so that the name finds it."""
    for name in ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            return
        except OSError:
            pass
    patterns = []
    for root in sys.path:
        patterns.append(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so*"))
        patterns.append(os.path.join(root, "nvidia", "lib", "libnvrtc.so*"))
    patterns += ["/usr/local/cuda/lib64/libnvrtc.so*", "/usr/local/cuda-*/lib64/libnvrtc.so*"]
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            if "builtins" in os.path.basename(path):
                continue
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue
    # Not found: the library says so at the first allocation, on stderr.


def _limit(v: Optional[int], what: str) -> int:
    if v is None:
        return -1
    v = int(v)
    if v < 0:
        raise ValueError(f"{what} must be at least 0, or None for the default")
    return v


def configure(
    policy: str = "deferred",
    cache_limit: Optional[int] = None,
    memory_limit: Optional[int] = None,
    library: Optional[str] = None,
    backend: Optional[str] = None,
) -> ctypes.CDLL:
    """Loads the library and configures it (``inflight_torch_configure``),
    without PyTorch; returns the library. :func:`enable` calls it; called on
    its own with ``backend="sim"`` it gives the C ABI over inflight's
    simulated GPU, for tests without a GPU. Arguments as for :func:`enable`."""
    if policy not in _POLICIES:
        raise ValueError(f"policy must be one of {_POLICIES}, not {policy!r}")
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS} or None, not {backend!r}")
    cache, memory = _limit(cache_limit, "cache_limit"), _limit(memory_limit, "memory_limit")
    lib = load(library)
    rc = lib.inflight_torch_configure(
        policy.encode(), cache, memory, backend.encode() if backend else None
    )
    if rc == -2:
        raise InflightTorchError(
            "inflight_torch was configured too late: the library has already allocated"
        )
    if rc != 0:
        raise InflightTorchError(
            f"inflight_torch_configure failed ({rc}); the reason is on stderr"
        )
    return lib


def enable(
    policy: str = "deferred",
    cache_limit: Optional[int] = None,
    memory_limit: Optional[int] = None,
    library: Optional[str] = None,
) -> None:
    """Makes inflight PyTorch's CUDA allocator. Call before CUDA is
    initialised (before any CUDA tensor, ``torch.cuda.init()``,
    ``torch.cuda.current_device()``...).

    - ``policy``: ``"deferred"`` (the default: a freed block is reused on
      its own stream at once, and elsewhere or released only once every
      stream that used it has passed the free), ``"retained"``, or
      ``"immediate"``, which reproduces the defect inflight prevents (a
      freed block goes to the next request on any stream at once): for
      demonstrations only; it corrupts results.
    - ``cache_limit``, ``memory_limit``: bytes per device (``None``: the
      defaults, 95% of the device's memory for the memory limit and the
      memory limit for the cache). ``torch.cuda.set_per_process_memory_fraction``
      also sets the memory limit, through the memory-fraction hook.
    - ``library``: the path of ``libinflight_torch.so`` (see the module doc
      for where it is looked for otherwise).

    The backend is CUDA: PyTorch's kernels cannot use the simulated GPU's
    addresses (:func:`configure` with ``backend="sim"`` is for tests), so
    ``INFLIGHT_TORCH_BACKEND=sim`` in the environment is refused here.

    Raises :class:`InflightTorchError` if CUDA is already initialised (too
    late: PyTorch's own allocator is in use), or the library cannot be
    found, loaded or configured; ``ValueError`` for a bad argument. Calling
    it again with the same arguments does nothing.
    """
    global _enabled, _allocator
    if policy not in _POLICIES:
        raise ValueError(f"policy must be one of {_POLICIES}, not {policy!r}")
    args = dict(policy=policy, cache_limit=cache_limit, memory_limit=memory_limit)
    if _enabled is not None:
        if _enabled == args:
            return
        raise InflightTorchError(f"inflight_torch is already enabled with {_enabled}")
    if os.environ.get("INFLIGHT_TORCH_BACKEND", "cuda").strip().lower() not in ("", "cuda"):
        raise InflightTorchError(
            "INFLIGHT_TORCH_BACKEND is set to "
            f"{os.environ['INFLIGHT_TORCH_BACKEND']!r}: PyTorch needs the CUDA backend"
        )
    import torch  # noqa: PLC0415 (the package loads without PyTorch)

    if torch.cuda.is_initialized():
        raise InflightTorchError(
            "inflight_torch.enable() comes too late: CUDA is already initialised, so PyTorch's "
            "own allocator is in use. Call it at the start of the program, before anything "
            "touches CUDA (tensors on the GPU, torch.cuda.init(), torch.cuda.current_device())."
        )
    _preload_nvrtc()
    lib = configure(policy, cache_limit, memory_limit, library, backend="cuda")
    alloc = torch.cuda.memory.CUDAPluggableAllocator(
        _path, "inflight_torch_malloc", "inflight_torch_free"
    )
    raw = alloc.allocator()

    def fn(name: str) -> int:
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value

    hooks = [
        ("set_record_stream_fn", "inflight_torch_record_stream"),
        ("set_reset_fn", "inflight_torch_empty_cache"),
        ("set_init_fn", "inflight_torch_init"),
        ("set_memory_fraction_fn", "inflight_torch_set_memory_fraction"),
    ]
    for method, symbol in hooks:
        setter = getattr(raw, method, None)
        if setter is None:
            msg = f"this PyTorch ({torch.__version__}) has no {method}: {symbol} is not plugged in"
            if method == "set_record_stream_fn":
                msg += (
                    "; Tensor.record_stream will be ignored, so memory used on a second "
                    "stream may be reused before that stream is done with it"
                )
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            continue
        setter(fn(symbol))
    try:
        torch.cuda.memory.change_current_allocator(alloc)
    except RuntimeError as e:
        raise InflightTorchError(
            f"PyTorch refused the allocator ({e}): enable() must come before CUDA is initialised"
        ) from e
    _allocator = alloc
    _enabled = args


def _device_index(device: Any) -> int:
    if device is None:
        if _enabled is not None and backend() != "sim":
            import torch  # noqa: PLC0415

            return torch.cuda.current_device()
        return 0
    if isinstance(device, int):
        return device
    index = getattr(device, "index", None)
    if index is not None:
        return int(index)
    if isinstance(device, str) and ":" in device:
        return int(device.rsplit(":", 1)[1])
    return 0


def _raw_stats(device: Any = None) -> _Stats:
    lib = _lib if _lib is not None else load()
    s = _Stats()
    rc = lib.inflight_torch_stats(_device_index(device), ctypes.byref(s), ctypes.sizeof(s))
    if rc != 0:
        raise InflightTorchError(f"inflight_torch_stats failed ({rc}); the reason is on stderr")
    return s


def memory_stats(device: Any = None) -> Dict[str, int]:
    """One device's figures under the names ``torch.cuda.memory_stats``
    uses, plus inflight's own (``cache_hits``, ``cached_ready_bytes``,
    ``cached_pending_bytes``, ``deferred_frees``, ``waits``, ``streams``,
    ``allocations``, ``frees``). Byte figures are of inflight's blocks
    (requests rounded up to their size class), as PyTorch's are of its
    rounded blocks."""
    s = _raw_stats(device)
    return {
        "allocated_bytes.all.current": s.allocated_bytes,
        "allocated_bytes.all.peak": s.peak_allocated_bytes,
        "active_bytes.all.current": s.allocated_bytes,
        "active_bytes.all.peak": s.peak_allocated_bytes,
        "reserved_bytes.all.current": s.reserved_bytes,
        "reserved_bytes.all.peak": s.peak_reserved_bytes,
        "allocation.all.current": s.active_count,
        "allocation.all.allocated": s.allocations,
        "allocation.all.freed": s.frees,
        "num_device_alloc": s.device_allocations,
        "num_device_free": s.device_releases,
        "num_alloc_retries": s.device_alloc_failures,
        "num_ooms": s.oom_errors,
        "cache_hits": s.cache_hits,
        "cached_ready_bytes": s.cached_ready_bytes,
        "cached_pending_bytes": s.cached_pending_bytes,
        "allocations": s.allocations,
        "frees": s.frees,
        "deferred_frees": s.deferred_frees,
        "waits": s.waits,
        "streams": s.streams,
    }


def memory_allocated(device: Any = None) -> int:
    """Bytes in live allocations (``torch.cuda.memory_allocated``)."""
    return _raw_stats(device).allocated_bytes


def memory_reserved(device: Any = None) -> int:
    """Bytes held from the device (``torch.cuda.memory_reserved``)."""
    return _raw_stats(device).reserved_bytes


def max_memory_allocated(device: Any = None) -> int:
    """The peak of :func:`memory_allocated` (``torch.cuda.max_memory_allocated``)."""
    return _raw_stats(device).peak_allocated_bytes


def max_memory_reserved(device: Any = None) -> int:
    """The peak of :func:`memory_reserved` (``torch.cuda.max_memory_reserved``)."""
    return _raw_stats(device).peak_reserved_bytes


def reset_peak_memory_stats(device: Any = None) -> None:
    """Resets the peaks to the current figures (``device=-1``: every device)."""
    lib = _lib if _lib is not None else load()
    lib.inflight_torch_reset_peak(-1 if device == -1 else _device_index(device))


def empty_cache() -> None:
    """Gives every device's cached memory back to it (pending blocks once
    their work is done); ``torch.cuda.empty_cache()`` does the same through
    the reset hook."""
    lib = _lib if _lib is not None else load()
    lib.inflight_torch_empty_cache()
