"""Who may use the node: the API token, and where a node may listen without one.

A node on a loopback address answers everyone on the machine. Anywhere else
it must have an API token (`check_bind` refuses to start otherwise), and
every write request (``POST``) must then carry ``Authorization: Bearer
<token>`` (`check_bearer`, 401 otherwise); reads stay open. `check_token`
refuses, up front, a token that no client could send intact. The bearer
check compares with `hmac.compare_digest`, whose time does not depend on
where the given token and the node's differ.

Pure, synchronous functions: callable from any task or thread.
"""

from __future__ import annotations

import hmac
import ipaddress

from ._errors import HttpError


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only the loopback interface."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token(token: str | None) -> None:
    """Refuse (`ValueError`) a token that no client could send as it is.

    A token is 1 to 4096 printable ASCII characters without spaces: a header
    carries nothing else intact (a non-ASCII token, or one with spaces around
    it, would never match what a client sends).
    """
    if token is None:
        return
    if not token:
        raise ValueError("the API token must not be empty")
    if len(token) > 4096 or not all("!" <= ch <= "~" for ch in token):
        raise ValueError(
            "the API token must be printable ASCII without spaces (at most 4096 characters)"
        )


def check_bind(host: str, token: str | None) -> None:
    """Refuse (`ValueError`) to bind a non-loopback address without an API token, or a bad token."""
    check_token(token)
    if not is_loopback(host) and token is None:
        raise ValueError(
            f"refusing to listen on {host!r} without an API token: "
            "pass --token or set HBTRIO_TOKEN (or bind to 127.0.0.1)"
        )


def check_bearer(header: str | None, token: str) -> None:
    """Raise `HttpError` 401 unless an ``Authorization`` header is ``Bearer <token>``."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise HttpError(
            401,
            "unauthorized",
            "write requests need 'Authorization: Bearer <token>' with this node's token",
            headers=((b"www-authenticate", b'Bearer realm="hbtrio"'),),
        )
