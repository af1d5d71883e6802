"""Who may talk to the embedded engine's HTTP server.

The server needs an API key (`Authorization: Bearer KEY` on every route but the probes)
unless its user opts out explicitly with `no_auth`, and that opt-out is only allowed on a
loopback address: a server reachable from other hosts always needs a key. The check runs
before anything binds, so a refused configuration never serves a single request.
"""

from __future__ import annotations

import ipaddress
import os

API_KEY_ENV = "PHYSARUM_ENGINE_API_KEY"  # read by `physarum serve-engine` (keeps it off ps)


class EngineAuthError(ValueError):
    """The server's access settings are refused: no key without the loopback opt-out."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; False for anything reachable from outside
    (0.0.0.0 and :: listen on every interface)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def check_access(api_key: str | None, no_auth: bool, host: str) -> None:
    """Refuse a server that would serve without a key, unless opted out on loopback."""
    if api_key is not None and not api_key.strip():
        raise EngineAuthError("api_key: an empty key is no key; give a non-empty one")
    if api_key is not None:
        if no_auth:
            raise EngineAuthError("give either an API key or no_auth (--no-auth), not both")
        return
    if not no_auth:
        raise EngineAuthError(
            f"the engine server on {host} needs an API key: pass --api-key KEY (or set "
            f"{API_KEY_ENV}); clients then send 'Authorization: Bearer KEY'. To serve without "
            "one, bind a loopback address (--host 127.0.0.1) and pass --no-auth"
        )
    if not is_loopback(host):
        raise EngineAuthError(
            f"--no-auth is only allowed on a loopback bind (127.0.0.1, ::1), not {host!r}: "
            "a server other hosts can reach needs --api-key KEY"
        )


def key_from_env(flag_value: str | None) -> str | None:
    """--api-key if given, else the environment's key (None when neither is set)."""
    return flag_value if flag_value is not None else os.environ.get(API_KEY_ENV) or None
