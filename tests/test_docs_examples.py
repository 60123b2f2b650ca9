"""The examples in docs/reliability.md, devices.md, stores.md and api.md run and do what they say.

Every fenced block whose info string is ``python`` is a complete script: it
runs in a fresh namespace (in a temporary working directory) and must not
raise. Blocks marked ``python pytest`` are test modules for pytest-trio: they
are written to a temporary directory and run with pytest in a subprocess,
which must pass. Blocks marked anything else (``python no-run``) are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hbtrio

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ("reliability.md", "devices.md", "stores.md", "api.md")
SRC = str(Path(hbtrio.__file__).resolve().parents[1])
FENCE = re.compile(r"^```(python[^\n]*)\n(.*?)^```", re.M | re.S)


def blocks(kind: str, pages: tuple[str, ...] = PAGES) -> list[tuple[str, int, str]]:
    """(page, line, code) of every block of ``kind`` in ``pages``."""
    out = []
    for page in pages:
        text = (DOCS / page).read_text()
        for match in FENCE.finditer(text):
            if match.group(1).strip() == kind:
                line = text.count("\n", 0, match.start()) + 1
                out.append((page, line, match.group(2)))
    return out


def test_the_documents_have_examples() -> None:
    assert len(blocks("python", ("reliability.md",))) >= 4
    assert len(blocks("python pytest", ("reliability.md",))) >= 1
    assert len(blocks("python", ("devices.md",))) >= 5
    assert len(blocks("python", ("stores.md",))) >= 1  # a store written from the docs alone
    assert len(blocks("python", ("api.md",))) >= 1  # a live device


def ids(kind: str) -> list[str]:
    return [f"{page}:{line}" for page, line, _ in blocks(kind)]


@pytest.mark.parametrize(("page", "line", "code"), blocks("python"), ids=ids("python"))
def test_example_runs(
    page: str, line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    exec(compile(code, f"{page}:{line}", "exec"), namespace)


@pytest.mark.parametrize(
    ("page", "line", "code"), blocks("python pytest"), ids=ids("python pytest")
)
def test_pytest_example_passes(page: str, line: int, code: str, tmp_path: Path) -> None:
    (tmp_path / f"test_doc_example_{line}.py").write_text(code)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "trio_mode=true",
            "--rootdir",
            str(tmp_path),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
