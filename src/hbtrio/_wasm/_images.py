"""Images: WASM modules by ID, checked against the JSON interface and compiled once.

Theory of operation
-------------------
An *image* is the bytes of a WASM module; its ID is the SHA-256 of those
bytes as unpadded base64url (43 characters, like message and blob IDs).
`ImageCache.load` turns bytes into an `Image`: the compiled `wasmtime.Module`
plus what an instance needs to know of it (its imports, its exported mutable
globals, whether it exports emscripten's stack pointer accessors). It

1. answers from memory when that ID was loaded before (compiled once per
   device, shared by every process of that image; at most ``max_images``
   kept, least recently used dropped first);
2. else, with a ``cache_dir``, deserializes the module compiled earlier and
   stored there (a file named by the image ID and a digest of the wasmtime
   version and configuration: a wasmtime upgrade compiles again);
3. else compiles it; a module refused for legacy exception handling is
   translated (`_exnref`) and compiled again, the translation kept in
   ``cache_dir`` too, by the same ID;
4. checks it: a ``memory`` export that is 64-bit, ``malloc(i64) -> i64``,
   ``handle(i64, i64) -> i64``, only function imports. Each refusal is a
   `WasmImageError` of one line naming the image.

Loading blocks (compiling aos takes about 0.2 s, translating it about a
second): call it in a thread. It is thread-safe, and two threads loading the
same ID compile it once.

The files of ``cache_dir`` are trusted: wasmtime runs a deserialized module's
machine code as it is, so the directory must be writable only by the user
that runs the engine.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Final

import attrs
import wasmtime

from ._errors import WasmImageError
from ._exnref import find_wasm_opt, how_to_translate, is_legacy_eh_error, translate

__all__ = ["PAGE", "Image", "ImageCache", "image_id"]

PAGE: Final = 65536
STACK_GET: Final = "emscripten_stack_get_current"
STACK_SET: Final = "_emscripten_stack_restore"


def image_id(data: bytes) -> str:
    """The ID of an image: SHA-256 of its bytes, unpadded base64url."""
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


@attrs.frozen(eq=False)
class Image:
    """A compiled image and what its instances need to know of it."""

    id: str
    module: wasmtime.Module
    imports: tuple[wasmtime.ImportType, ...]
    #: Its exported mutable globals of a number type, ``(name, type)`` (kept in snapshots).
    globals: tuple[tuple[str, str], ...]
    #: Whether it exports emscripten's stack pointer accessors (kept in snapshots).
    stack: bool
    #: Its memory's size when instantiated, in bytes.
    initial_memory: int
    #: Whether it was translated from legacy exception handling.
    translated: bool = False


def _sig(t: wasmtime.FuncType) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(str(p) for p in t.params), tuple(str(r) for r in t.results)


def check(image: str, module: wasmtime.Module, translated: bool = False) -> Image:
    """The `Image` of a compiled module; `WasmImageError` when it is not the JSON interface."""
    exports = {e.name: e.type for e in module.exports}
    memory = exports.get("memory")
    if not isinstance(memory, wasmtime.MemoryType):
        raise WasmImageError(f"image {image} exports no memory named 'memory'")
    if not memory.is_64:
        raise WasmImageError(
            f"image {image} has a 32-bit memory: the JSON interface (wasm-64@1.0) runs memory64 "
            "modules"
        )
    for name, want in (("malloc", (("i64",), ("i64",))), ("handle", (("i64", "i64"), ("i64",)))):
        fn = exports.get(name)
        if not isinstance(fn, wasmtime.FuncType):
            raise WasmImageError(f"image {image} exports no function {name!r}")
        if _sig(fn) != want:
            params, results = _sig(fn)
            raise WasmImageError(
                f"image {image}: {name} is ({', '.join(params)}) -> ({', '.join(results)}), "
                f"not ({', '.join(want[0])}) -> ({', '.join(want[1])})"
            )
    for imp in module.imports:
        if not isinstance(imp.type, wasmtime.FuncType):
            kind = type(imp.type).__name__.removesuffix("Type").lower()
            raise WasmImageError(
                f"image {image} imports a {kind} ({imp.module}.{imp.name}): only functions can "
                "be provided"
            )
    mutable = tuple(
        (name, str(t.content))
        for name, t in exports.items()
        if isinstance(t, wasmtime.GlobalType)
        and t.mutable
        and str(t.content) in ("i32", "i64", "f32", "f64")
    )
    get, put = exports.get(STACK_GET), exports.get(STACK_SET)
    stack = (
        isinstance(get, wasmtime.FuncType)
        and isinstance(put, wasmtime.FuncType)
        and _sig(get) == ((), ("i64",))
        and _sig(put) == (("i64",), ())
    )
    return Image(
        id=image,
        module=module,
        imports=tuple(module.imports),
        globals=mutable,
        stack=stack,
        initial_memory=memory.limits.min * PAGE,
        translated=translated,
    )


def _first_line(exc: BaseException) -> str:
    """wasmtime's most telling line of an error (its last cause), without its number."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return repr(exc)
    return re.sub(r"^\d+: ", "", lines[-1])[:300]


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ImageCache:
    """Compiled images of one wasmtime engine, by ID (see the module)."""

    def __init__(
        self,
        engine: wasmtime.Engine,
        key: str,
        cache_dir: Path | None,
        *,
        max_images: int = 32,
    ) -> None:
        self._engine = engine
        self._key = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.cache_dir = cache_dir
        self._max = max_images
        self._lock = threading.Lock()
        self._images: collections.OrderedDict[str, Image] = collections.OrderedDict()
        self._loading: dict[str, threading.Lock] = {}  # guarded by _lock
        #: Counters: compiled, deserialized (from cache_dir), translated, hits (from memory).
        self.counts: collections.Counter[str] = collections.Counter()

    def get(self, image: str) -> Image | None:
        """The image if it is loaded (compiled) already, else ``None``. Never blocks for long."""
        with self._lock:
            found = self._images.get(image)
            if found is not None:
                self._images.move_to_end(image)
                self.counts["hits"] += 1
            return found

    def load(self, image: str, data: bytes) -> Image:
        """The image ``image`` whose bytes are ``data``, compiled once. Blocks; thread-safe."""
        found = self.get(image)
        if found is not None:
            return found
        with self._lock:
            lock = self._loading.setdefault(image, threading.Lock())
        with lock:
            found = self.get(image)
            if found is not None:
                return found
            loaded = self._load(image, data)
            with self._lock:
                self._images[image] = loaded
                while len(self._images) > self._max:
                    self._images.popitem(last=False)
                self._loading.pop(image, None)
            return loaded

    def _load(self, image: str, data: bytes) -> Image:
        if data[:4] != b"\0asm":
            raise WasmImageError(f"image {image} is not a WebAssembly binary (no \\0asm header)")
        compiled = self._compiled_path(image)
        if compiled is not None and compiled.is_file():
            try:
                # Read, not mapped (deserialize_file): a file truncated under a mapping
                # would crash the process with SIGBUS.
                module = wasmtime.Module.deserialize(self._engine, compiled.read_bytes())
            except (wasmtime.WasmtimeError, OSError):
                pass  # another wasmtime's, or damaged: compile again below
            else:
                self.counts["deserialized"] += 1
                return check(image, module)
        module, translated = self._compile(image, data)
        loaded = check(image, module, translated)
        if compiled is not None:
            try:
                _write_atomically(compiled, bytes(module.serialize()))
            except OSError:
                pass  # a cache that cannot be written is no cache, not a failure
        return loaded

    def _compile(self, image: str, data: bytes) -> tuple[wasmtime.Module, bool]:
        try:
            module = wasmtime.Module(self._engine, data)
        except wasmtime.WasmtimeError as exc:
            if not is_legacy_eh_error(str(exc)):
                raise WasmImageError(
                    f"image {image} does not compile: {_first_line(exc)}"
                ) from None
        else:
            self.counts["compiled"] += 1
            return module, False
        translated = self._translated(image, data)
        try:
            module = wasmtime.Module(self._engine, translated)
        except wasmtime.WasmtimeError as exc:
            raise WasmImageError(
                f"image {image} does not compile once translated to standard exception "
                f"handling: {_first_line(exc)}"
            ) from None
        self.counts["compiled"] += 1
        return module, True

    def _translated(self, image: str, data: bytes) -> bytes:
        path = None if self.cache_dir is None else self.cache_dir / "exnref" / f"{image}.wasm"
        if path is not None and path.is_file():
            return path.read_bytes()
        wasm_opt = find_wasm_opt()
        if wasm_opt is None:
            raise WasmImageError(
                f"image {image} uses legacy WASM exception handling (try/catch), which wasmtime "
                f"does not run: {how_to_translate()}, and use OUT.wasm"
            )
        translated = translate(data, image, wasm_opt)
        self.counts["translated"] += 1
        if path is not None:
            try:
                _write_atomically(path, translated)
            except OSError:
                pass
        return translated

    def _compiled_path(self, image: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / "modules" / f"{image}-{self._key}.cwasm"
