"""The public namespace: names presented as hbtrio's own, and the error hierarchy."""

from __future__ import annotations

import types
import typing

import pytest

import hbtrio

# Public submodules (``hbtrio.testing``) show up here once imported; they are not re-exports.
PUBLIC = sorted(
    name
    for name in dir(hbtrio)
    if not name.startswith("_") and not isinstance(getattr(hbtrio, name), types.ModuleType)
)

#: Public names that are type aliases: their ``__module__`` is that of the aliased type.
TYPE_ALIASES = {"SlotResult"}


def test_there_are_public_names() -> None:
    for name in ("open_engine", "message_id", "MemoryStore", "SQLiteStore", "InvalidMessage"):
        assert name in PUBLIC


@pytest.mark.parametrize("name", [n for n in PUBLIC if n not in TYPE_ALIASES])
def test_public_names_belong_to_hbtrio(name: str) -> None:
    assert getattr(hbtrio, name).__module__ == "hbtrio"


@pytest.mark.parametrize("name", sorted(TYPE_ALIASES))
def test_type_aliases_are_aliases(name: str) -> None:
    assert typing.get_origin(getattr(hbtrio, name)) is not None


ERRORS = [
    n
    for n in PUBLIC
    if isinstance(getattr(hbtrio, n), type) and issubclass(getattr(hbtrio, n), BaseException)
]


def test_the_documented_errors_are_exported() -> None:
    documented = {
        "HbTrioError",
        "InvalidMessage",
        "ProcessNotFound",
        "UnknownDevice",
        "ComputeError",
        "SlotNotScheduled",
        "LeaderDied",
        "EngineClosed",
    }
    assert documented <= set(ERRORS)


@pytest.mark.parametrize("name", ERRORS)
def test_every_error_is_an_hbtrio_error(name: str) -> None:
    assert issubclass(getattr(hbtrio, name), hbtrio.HbTrioError)
    assert issubclass(getattr(hbtrio, name), Exception)


def test_error_relations() -> None:
    assert issubclass(hbtrio.InvalidMessage, ValueError)
    assert issubclass(hbtrio.SlotNotScheduled, hbtrio.ComputeError)
    error = hbtrio.SlotNotScheduled("pid", 4, 3)
    assert (error.phase, error.attempted_slot, error.latest, error.pid) == (
        "get-schedule",
        4,
        3,
        "pid",
    )
    assert issubclass(hbtrio.ProcessNotFound, LookupError)
    assert issubclass(hbtrio.UnknownDevice, LookupError)
    assert not issubclass(hbtrio.ComputeError, ValueError)


def test_version() -> None:
    assert isinstance(hbtrio.__version__, str)


def test_the_node_api_is_the_public_module_hbtrio_http() -> None:
    import hbtrio.http

    for name in hbtrio.http.__all__:
        obj = getattr(hbtrio.http, name)
        if isinstance(obj, type) or callable(obj):
            assert obj.__module__ == "hbtrio.http", name
    for name in ("make_app", "run_server", "serve", "HttpApp"):
        assert name in hbtrio.http.__all__
