"""Compiled steps that survive the process: XLA executables stored on disk and loaded without tracing.

`StoredFunction` stands where `jax.jit(fn)` stood. Called with arguments it has not met, it finds their executable
in memory, else loads it from the active `ExecutableStore`, else traces, lowers and compiles it (and stores it).
Loading skips tracing and lowering entirely, which JAX's own persistent compilation cache does not: a restart
costs reading files, not minutes of tracing.

A stored file is named by what it computes (the function's static key and its arguments' shapes, dtypes and tree)
and says in its header what built it: jax and jaxlib versions, platform, device kind and count, XLA_FLAGS and a
fingerprint of jkv's own source. A file whose header differs is recompiled, and the log says which item differed;
a file that is not one of jkv's, or whose checksum fails, is refused in one line and recompiled, never loaded.
The file holds no pickle: the output tree is written as JSON of node types from jkv or Python's builtins.

One store is active per process (`open_store`; `Engine(compile_cache_dir=...)` opens it).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import struct
import threading
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np
from jax.experimental import serialize_executable

log = logging.getLogger("jkv.compile_cache")

MAGIC = b"jkv-executable v1\n"
_DIGEST = 32  # sha256 of everything before it
_SOURCE_PACKAGES = ("jkv", "pallas_kernels", "kvspec")
_MRU = 4  # executables a function tries before looking its arguments up


class CacheFileError(ValueError):
    """A stored file that is not a jkv executable, or is corrupt."""


_fingerprint: str | None = None


def source_fingerprint() -> str:
    """sha256 over jkv's, the kernels' and kvspec's Python sources: an edit to any of them is a new key."""
    global _fingerprint
    if _fingerprint is None:
        root = Path(__file__).resolve().parent.parent
        h = hashlib.sha256()
        for package in _SOURCE_PACKAGES:
            for path in sorted((root / package).rglob("*.py")):
                h.update(str(path.relative_to(root)).encode())
                h.update(path.read_bytes())
        _fingerprint = h.hexdigest()[:16]
    return _fingerprint


def environment() -> dict[str, Any]:
    """What built an executable; each item must match for it to be loaded."""
    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jkv_source": source_fingerprint(),
    }


def signature(args: tuple) -> str:
    """The arguments' tree, and each leaf's shape, dtype and weak type: what an executable was compiled for."""
    leaves, tree = jax.tree.flatten(args)
    parts = [str(tree)]
    for leaf in leaves:
        weak = getattr(leaf, "weak_type", False)
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        parts.append(f"{np.shape(leaf)}:{dtype}{':weak' if weak else ''}")
    return "|".join(parts)


# Output trees as JSON (no pickle) ----------------------------------------------------------------------------
_BUILTIN_TYPES = {"tuple": tuple, "list": list, "dict": dict, "NoneType": type(None)}


def _encode_tree(tree) -> dict:
    data = tree.node_data()
    if data is None:
        return {"leaf": True}
    typ, aux = data
    if typ.__module__ == "builtins":
        name = typ.__name__
    elif typ.__module__.split(".")[0] in _SOURCE_PACKAGES:
        name = f"{typ.__module__}:{typ.__qualname__}"
    else:
        raise CacheFileError(f"output node type {typ!r} is not jkv's or a builtin: not stored")
    aux = list(aux) if isinstance(aux, tuple | list) else aux
    if not (aux is None or isinstance(aux, list) and all(isinstance(a, str | int) for a in aux)):
        raise CacheFileError(f"output node {name} has auxiliary data {aux!r}: not stored")
    return {"type": name, "aux": aux, "children": [_encode_tree(c) for c in tree.children()]}


def _node_type(name: str) -> type:
    if name in _BUILTIN_TYPES:
        return _BUILTIN_TYPES[name]
    module, _, qualname = name.partition(":")
    if module.split(".")[0] not in _SOURCE_PACKAGES or not qualname:
        raise CacheFileError(f"node type {name!r} is not jkv's or a builtin")
    import importlib

    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _decode_tree(node: dict):
    if node.get("leaf"):
        return jax.tree.structure(0)
    typ = _node_type(node["type"])
    aux = node["aux"]
    aux = tuple(aux) if isinstance(aux, list) and typ is not list else aux
    if typ is dict:
        aux = list(node["aux"])
    children = [_decode_tree(c) for c in node["children"]]
    return jax.tree_util.PyTreeDef.from_node_data_and_children(
        jax.tree_util.default_registry, (typ, aux), children
    )


class ExecutableStore:
    """A directory of stored executables. `stats` counts loaded, compiled, stored, refused and stale files."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"compile cache directory {self.directory} cannot be created ({err}).") from None
        self.environment = environment()
        self.stats: Counter[str] = Counter()
        self.messages: list[str] = []

    def path(self, name: str, sig: str) -> Path:
        return self.directory / f"{hashlib.sha256((name + '\n' + sig).encode()).hexdigest()[:40]}.jkvx"

    def _note(self, kind: str, message: str) -> None:
        self.stats[kind] += 1
        self.messages.append(message)
        log.warning(message)

    def load(self, name: str, sig: str, in_tree, devices=None) -> jax.stages.Compiled | None:
        """The stored executable, loaded onto `devices` (those it was compiled for; None: every device)."""
        path = self.path(name, sig)
        if not path.is_file():
            return None
        try:
            header, payload = read_file(path)
        except (OSError, CacheFileError) as err:
            self._note("refused", f"compile cache: refused {path.name}: {err}; recompiling.")
            return None
        if header.get("name") != name or header.get("signature") != sig:
            self._note("refused", f"compile cache: refused {path.name}: it holds another function or shape; "
                                  "recompiling.")  # fmt: skip
            return None
        built = header.get("environment", {})
        changed = [k for k, v in self.environment.items() if built.get(k) != v]
        if changed:
            k = changed[0]
            self._note("stale", f"compile cache: {path.name} was built with {k}={built.get(k)!r}, this process has "
                                f"{self.environment[k]!r}; recompiling.")  # fmt: skip
            return None
        try:
            out_tree = _decode_tree(header["out_tree"])
            compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree, execution_devices=devices)
        except Exception as err:  # noqa: BLE001 - a file XLA or the tree decoder cannot take: recompile
            self._note("refused", f"compile cache: refused {path.name}: it does not load ({type(err).__name__}); "
                                  "recompiling.")  # fmt: skip
            return None
        self.stats["loaded"] += 1
        return compiled

    def save(self, name: str, sig: str, compiled: jax.stages.Compiled) -> None:
        try:
            payload, _, out_tree = serialize_executable.serialize(compiled)
            header = {"name": name, "signature": sig, "environment": self.environment,
                      "out_tree": _encode_tree(out_tree)}  # fmt: skip
        except Exception as err:  # noqa: BLE001 - an executable XLA cannot serialize still runs; it is not stored
            self._note("unstored", f"compile cache: {name} is not stored ({type(err).__name__}: {err}).")
            return
        path = self.path(name, sig)
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(encode_file(header, payload))
        tmp.replace(path)  # atomic: a concurrent reader sees the old file or the new one
        self.stats["stored"] += 1


def encode_file(header: dict, payload: bytes) -> bytes:
    head = json.dumps(header, sort_keys=True).encode()
    body = MAGIC + struct.pack("<Q", len(head)) + head + payload
    return body + hashlib.sha256(body).digest()


def read_file(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise CacheFileError("not a jkv executable file")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if len(data) < len(MAGIC) + 8 + _DIGEST or hashlib.sha256(body).digest() != digest:
        raise CacheFileError("its checksum does not match (corrupt or edited)")
    (n,) = struct.unpack("<Q", body[len(MAGIC) : len(MAGIC) + 8])
    start = len(MAGIC) + 8
    try:
        header = json.loads(body[start : start + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CacheFileError("its header is not JSON") from None
    if not isinstance(header, dict):
        raise CacheFileError("its header is not an object")
    return header, body[start + n :]


_active: ExecutableStore | None = None
_active_lock = threading.Lock()


def open_store(directory: str | Path | None) -> ExecutableStore | None:
    """Make `directory` the process's store (None: keep executables in memory only); the same directory is reused."""
    global _active
    with _active_lock:
        if directory is None:
            return _active
        if _active is None or _active.directory.resolve() != Path(directory).resolve():
            if _active is not None:
                log.info("compile cache: switching from %s to %s", _active.directory, directory)
            _active = ExecutableStore(directory)
        return _active


def active_store() -> ExecutableStore | None:
    return _active


def close_store() -> None:
    global _active
    with _active_lock:
        _active = None


_TYPE_MISMATCH = ("Argument types differ", "does not match the input pytree")
_FUNCTIONS: weakref.WeakSet[StoredFunction] = weakref.WeakSet()  # every StoredFunction alive


def _release_executables() -> None:
    """At exit, before JAX's own clean-up of its backends (atexit runs the last registered first, and this module
    imports jax first): drop the executables every StoredFunction holds, so none outlives the client that made it.
    Without it an XLA:CPU process that had loaded executables from the store aborted at exit ("terminate called
    without an active exception") in about 1 of 16 runs, after all its work was done."""
    for fn in list(_FUNCTIONS):
        fn.release()


atexit.register(_release_executables)


class StoredFunction:
    """`jax.jit(fn, donate_argnums=...)`, with its executables looked up by argument signature, loaded from the
    active store, or compiled and stored. `name` is the function's static key (its repr names one computation)."""

    def __init__(self, name: str, fn, donate_argnums: int | tuple[int, ...] = (), devices=None) -> None:
        """devices: the devices the executables run on, in mesh order (a sharded step's mesh); None: every
        device (a stored single-device executable loads onto the first)."""
        self.name = name
        self.devices = None if devices is None else list(devices)
        self.jitted = jax.jit(fn, donate_argnums=donate_argnums)
        self._by_signature: dict[str, jax.stages.Compiled] = {}
        self._recent: list[jax.stages.Compiled] = []
        self._lock = threading.Lock()
        _FUNCTIONS.add(self)

    def release(self) -> None:
        """Drop the executables held (the next call looks them up again: the store, or a compile)."""
        with self._lock:
            self._by_signature.clear()
            self._recent = []

    def __call__(self, *args):
        for compiled in self._recent:
            try:
                return compiled(*args)
            except TypeError as err:  # raised before anything runs (donated buffers untouched)
                if not any(s in str(err) for s in _TYPE_MISMATCH):
                    raise
        compiled = self.executable(args)
        with self._lock:
            self._recent = [compiled, *(c for c in self._recent if c is not compiled)][:_MRU]
        return compiled(*args)

    def lower(self, *args):
        return self.jitted.lower(*args)

    def cache_size(self) -> int:
        """Executables this function holds in memory (one per argument signature met)."""
        return len(self._by_signature)

    def precompile(self, *args) -> jax.stages.Compiled:
        """The executable for `args`, loaded or compiled now (warm-up runs this on several threads)."""
        return self.executable(args)

    def executable(self, args: tuple) -> jax.stages.Compiled:
        sig = signature(args)
        compiled = self._by_signature.get(sig)
        if compiled is not None:
            return compiled
        store = _active
        in_tree = jax.tree.structure((args, {}))
        if store is not None:
            compiled = store.load(self.name, sig, in_tree, self.devices)
        if compiled is None:
            compiled = self.jitted.lower(*args).compile()
            if store is not None:
                store.stats["compiled"] += 1
                store.save(self.name, sig, compiled)
        with self._lock:
            return self._by_signature.setdefault(sig, compiled)
