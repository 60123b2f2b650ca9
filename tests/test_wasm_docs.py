"""The runnable examples of docs/wasm.md run (the aos ones, which need a module, are no-run)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("wasmtime")

from test_docs_examples import blocks

PAGE = ("wasm.md",)


def test_the_page_has_examples() -> None:
    assert len(blocks("python", PAGE)) >= 1
    assert len(blocks("python no-run", PAGE)) >= 2


@pytest.mark.parametrize(("page", "line", "code"), blocks("python", PAGE))
def test_example_runs(
    page: str, line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HBTRIO_WASM_CACHE", "off")
    exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__main__"})
