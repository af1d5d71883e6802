"""One SGLang worker as the engine sees it: its URL, its HTTP client, its TP size, and (when
Physarum launched it) the server process that can be restarted."""

from __future__ import annotations

from dataclasses import dataclass

from rollout.http_client import SGLangClient
from rollout.sglang.server import SGLangServer


@dataclass
class Worker:
    """An SGLang server the engine controls directly (weight updates, pause, abort)."""

    url: str
    client: SGLangClient
    tp: int = 1
    server: SGLangServer | None = None
    """The process manager when Physarum launched the server; None for an external server."""

    @classmethod
    def for_server(cls, server: SGLangServer, *, timeout: float = 120.0) -> Worker:
        client = SGLangClient(server.url, api_key=server.args.api_key, timeout=timeout)
        return cls(url=server.url, client=client, tp=server.args.tp, server=server)

    @classmethod
    def external(
        cls, url: str, *, tp: int = 1, api_key: str | None = None, timeout: float = 120.0
    ) -> Worker:
        return cls(url=url, client=SGLangClient(url, api_key=api_key, timeout=timeout), tp=tp)
