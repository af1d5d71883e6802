"""Async HTTP client for SGLang 0.5.23 servers and for our embedded engine's server.

Both speak the same API (reference/sglang_api.md section B), so one client serves both, and
the same client talks to an `sglang-router` for `/generate`. Retries happen on connection
errors only (the request never reached the server, so a retry cannot double-generate), with
exponential backoff. Every failure raises `EngineHTTPError`, whose message names the server,
the route, the request id and the HTTP status.

`serialize_named_tensors` produces SGLang's `MultiprocessingSerializer` format (torch's
`ForkingPickler` + base64) without importing sglang. For CPU tensors the caller must first call
`torch.multiprocessing.set_sharing_strategy("file_system")`: with the default `file_descriptor`
strategy the receiving server cannot rebuild the storages (sglang_api.md A.3 #5).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from typing import Any

import httpx

from models.weight_update import WeightUpdate, encode_weight_update
from rollout.http_output import (  # noqa: F401  (re-exported)
    DEFAULT_VERSION,
    expand_weight_versions,
    parse_generate_item,
    version_to_int,
)
from rollout.routing_wire import RoutingLayout
from rollout.types import GenerateOutput, GenerateRequest

logger = logging.getLogger(__name__)

_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout)


class EngineHTTPError(RuntimeError):
    """A failed call to an engine server; str() names the server, route, rid and status."""

    def __init__(
        self,
        server: str,
        route: str,
        message: str,
        *,
        rid: str | None = None,
        status: int | None = None,
    ) -> None:
        self.server = server
        self.route = route
        self.rid = rid
        self.status = status
        self.message = message
        where = f"{server}{route}" + (f" (rid {rid})" if rid else "")
        code = f"HTTP {status}" if status is not None else "no response"
        super().__init__(f"{where}: {code}: {message}")


class SGLangClient:
    """Async client for one SGLang-compatible server (or an sglang-router).

    `generate` sends one HTTP request per GenerateRequest, concurrently, so a router can spread
    them. When `return_logprob` is False, `GenerateOutput.logprobs` is empty. A request with
    `return_routed_experts` (R3) needs `routing`, the served model's MoE layout, to map
    SGLang's routed experts to ours (rollout/routing_wire.py).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.2,
        max_connections: int = 256,
        routing: RoutingLayout | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries: expected >= 0, got {retries}")
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.routing = routing
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=64),
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> SGLangClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- transport -------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        route: str,
        *,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        rid: str | None = None,
        ok_statuses: tuple[int, ...] = (200,),
    ) -> httpx.Response:
        attempt = 0
        while True:
            try:
                resp = await self._http.request(method, route, json=json_body, params=params)
            except _RETRYABLE as e:
                if attempt >= self.retries:
                    raise EngineHTTPError(
                        self.base_url, route, f"connection failed after {attempt + 1} tries: {e}"
                    ) from e
                delay = self.backoff * (2**attempt)
                logger.warning("%s%s: %s; retry in %.2fs", self.base_url, route, e, delay)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            except httpx.HTTPError as e:
                raise EngineHTTPError(
                    self.base_url, route, f"{type(e).__name__}: {e}", rid=rid
                ) from e
            if resp.status_code not in ok_statuses:
                raise EngineHTTPError(
                    self.base_url, route, _error_text(resp), rid=rid, status=resp.status_code
                )
            return resp

    async def _post(self, route: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        resp = await self._request("POST", route, json_body=body or {})
        return _json_or_text(resp)

    # ---- generation --------------------------------------------------------------------------

    async def generate_raw(self, payload: dict[str, Any]) -> dict[str, Any] | list[Any]:
        """POST /generate with an SGLang payload; returns the parsed JSON (object or list)."""
        rid = payload.get("rid") if isinstance(payload.get("rid"), str) else None
        resp = await self._request("POST", "/generate", json_body=payload, rid=rid)
        return resp.json()

    async def _generate_one(self, req: GenerateRequest) -> list[GenerateOutput]:
        payload: dict[str, Any] = {
            "input_ids": list(req.input_ids),
            "sampling_params": req.sampling.to_sglang(),
            "return_logprob": req.return_logprob,
        }
        if req.rid is not None:
            payload["rid"] = req.rid
        start = None
        if req.return_routed_experts:
            if self.routing is None:
                raise ValueError(
                    f"{self.base_url}: return_routed_experts needs SGLangClient(routing=...), "
                    "the served model's MoE layout"
                )
            start = req.routed_experts_start_len
            start = len(req.input_ids) if start is None else start  # SGLang's default is 0
            payload["return_routed_experts"] = True
            payload["routed_experts_start_len"] = start
        data = await self.generate_raw(payload)
        items = data if isinstance(data, list) else [data]
        if len(items) != req.sampling.n:
            raise EngineHTTPError(
                self.base_url,
                "/generate",
                f"expected {req.sampling.n} outputs, got {len(items)}",
                rid=req.rid,
            )
        try:
            return [
                parse_generate_item(item, req.input_ids, routing=self.routing, routing_start=start)
                for item in items
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise EngineHTTPError(
                self.base_url, "/generate", f"malformed response: {e}", rid=req.rid
            ) from e

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        """Outputs in request order; the n samples of a request are consecutive."""
        groups = await asyncio.gather(*(self._generate_one(r) for r in requests))
        return [out for group in groups for out in group]

    # ---- health and info ---------------------------------------------------------------------

    async def _probe(self, route: str) -> bool:
        try:
            resp = await self._http.get(route)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def health(self) -> bool:
        return await self._probe("/health")

    async def health_generate(self) -> bool:
        return await self._probe("/health_generate")

    async def model_info(self) -> dict[str, Any]:
        return (await self._request("GET", "/model_info")).json()

    async def server_info(self) -> dict[str, Any]:
        return (await self._request("GET", "/server_info")).json()

    async def weight_version(self) -> str:
        """The server's weight_version string, from GET /model_info."""
        return str((await self.model_info())["weight_version"])

    # ---- weight updates ----------------------------------------------------------------------

    async def begin_weight_update(self, selector: str = "all") -> dict[str, Any]:
        return await self._post("/begin_weight_update", {"selector": selector})

    async def end_weight_update(self) -> dict[str, Any]:
        return await self._post("/end_weight_update", {})

    async def update_weights_from_tensor(
        self,
        serialized_named_tensors: list[str],
        *,
        load_format: str | None = None,
        flush_cache: bool = True,
        weight_version: str | None = None,
        abort_all_requests: bool = False,
    ) -> dict[str, Any]:
        """One base64 payload per TP rank (see `serialize_named_tensors`)."""
        body = {
            "serialized_named_tensors": serialized_named_tensors,
            "load_format": load_format,
            "flush_cache": flush_cache,
            "abort_all_requests": abort_all_requests,
            "weight_version": weight_version,
        }
        return await self._post("/update_weights_from_tensor", body)

    async def update_weights_from_weight_update(
        self,
        update: WeightUpdate,
        *,
        flush_cache: bool = True,
        weight_version: str | None = None,
    ) -> dict[str, Any]:
        """Physarum extension of /update_weights_from_tensor (our embedded server only): the
        compact models.weight_update encoding in field `physarum_weight_update`. Call it inside
        begin_weight_update() ... end_weight_update(), like the plain format."""
        body = {
            "physarum_weight_update": base64.b64encode(encode_weight_update(update)).decode(),
            "flush_cache": flush_cache,
            "weight_version": weight_version if weight_version is not None else str(update.version),
        }
        return await self._post("/update_weights_from_tensor", body)

    async def update_weights_from_disk(
        self,
        model_path: str,
        *,
        weight_version: str | None = None,
        load_format: str | None = None,
        abort_all_requests: bool = False,
        flush_cache: bool = True,
    ) -> dict[str, Any]:
        body = {
            "model_path": model_path,
            "weight_version": weight_version,
            "load_format": load_format,
            "abort_all_requests": abort_all_requests,
            "flush_cache": flush_cache,
        }
        return await self._post("/update_weights_from_disk", body)

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str = "weight_update_group",
        backend: str = "gloo",
    ) -> dict[str, Any]:
        """Blocks until the trainer (rank 0) joins the group concurrently."""
        body = {
            "master_address": master_address,
            "master_port": master_port,
            "rank_offset": rank_offset,
            "world_size": world_size,
            "group_name": group_name,
            "backend": backend,
        }
        return await self._post("/init_weights_update_group", body)

    async def update_weights_from_distributed(
        self,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        *,
        group_name: str = "weight_update_group",
        weight_version: str | None = None,
        load_format: str | None = None,
        flush_cache: bool = True,
    ) -> dict[str, Any]:
        """The trainer must broadcast each tensor, in list order, while this call is in flight."""
        body = {
            "names": names,
            "dtypes": dtypes,
            "shapes": shapes,
            "group_name": group_name,
            "weight_version": weight_version,
            "load_format": load_format,
            "flush_cache": flush_cache,
        }
        return await self._post("/update_weights_from_distributed", body)

    async def destroy_weights_update_group(
        self, group_name: str = "weight_update_group"
    ) -> dict[str, Any]:
        return await self._post("/destroy_weights_update_group", {"group_name": group_name})

    async def update_weight_version(
        self, new_version: str, abort_all_requests: bool = False
    ) -> dict[str, Any]:
        body = {"new_version": str(new_version), "abort_all_requests": abort_all_requests}
        return await self._post("/update_weight_version", body)

    # ---- flow control ------------------------------------------------------------------------

    async def pause_generation(self, mode: str = "abort") -> dict[str, Any]:
        return await self._post("/pause_generation", {"mode": mode})

    async def continue_generation(self) -> dict[str, Any]:
        return await self._post("/continue_generation", {})

    async def abort_request(self, rid: str | None = None, abort_all: bool = False) -> None:
        body: dict[str, Any] = {"abort_all": abort_all}
        if rid is not None:
            body["rid"] = rid
        await self._request("POST", "/abort_request", json_body=body, rid=rid)

    async def flush_cache(self) -> str:
        """POST /flush_cache; raises EngineHTTPError (400) while requests are running."""
        return (await self._request("POST", "/flush_cache")).text


def _json_or_text(resp: httpx.Response) -> dict[str, Any]:
    try:
        data = resp.json()
    except json.JSONDecodeError:
        return {"message": resp.text}
    return data if isinstance(data, dict) else {"result": data}


def _error_text(resp: httpx.Response) -> str:
    """The server's error message: SGLang uses {"error": str | {"message": str}} or
    {"success": false, "message": str} or plain text."""
    try:
        data = resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return resp.text.strip() or resp.reason_phrase
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if err is not None:
            return str(err)
        if "message" in data:
            return str(data["message"])
        if "detail" in data:
            return json.dumps(data["detail"])
    return json.dumps(data)


def serialize_named_tensors(named: list[tuple[str, Any]]) -> str:
    """SGLang's MultiprocessingSerializer.serialize(named, output_str=True), without sglang.

    named: [(hf_name, tensor)]. torch.multiprocessing registers the tensor reductions on
    ForkingPickler; storages are moved to shared memory and referenced by name.
    """
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers tensor reductions on ForkingPickler)

    buf = io.BytesIO()
    ForkingPickler(buf).dump(list(named))
    return base64.b64encode(buf.getvalue()).decode("utf-8")
