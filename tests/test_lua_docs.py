"""The examples of docs/lua.md run and do what they say; its Lua blocks are the project's
scripts (the counter there is tests/lua/counter.lua)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lua_kit import source
from test_docs_examples import DOCS, FENCE, blocks


@pytest.mark.parametrize(("page", "line", "code"), blocks("python", ("lua.md",)))
def test_example_runs(
    page: str, line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__main__"})


def test_the_counter_on_the_page_is_the_tested_one() -> None:
    text = (DOCS / "lua.md").read_text().replace("```lua", "```python lua")
    assert source("counter") in [m.group(2) for m in FENCE.finditer(text)]
