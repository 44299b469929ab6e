"""Many LoRA adapters on one served base: request routing, /v1/models entries and /v1/adapters.

`llmkit serve --model BASE --adapter support=DIR --adapter legal=DIR2` serves BASE under its name (say
``smol``) and each adapter as ``smol:support``, ``smol:legal``: a request picks one with
``"model": "smol:support"`` and runs in the same batch as requests of other adapters and of the plain base
(`llmkit.infer.multi_lora`: batched LoRA, adapters paged under `adapter_budget_mb`).

Endpoints (API-key protected like every /v1 route):

* ``GET /v1/models`` lists the base and one entry per adapter (``parent``: the base, ``root``: its dir).
* ``GET /v1/adapters``: every adapter with its dir, size, rank, whether it is resident and its in-flight
  requests.
* ``POST /v1/adapters`` ``{"name": ..., "path": ...}`` loads an adapter dir *on the server's filesystem*
  (anyone holding the API key can make the server read such a dir): 200 with its entry; 400
  ``invalid_adapter`` naming the problem (no such dir, not a LoRA adapter, built for another base, larger
  than the budget); 409 ``adapter_exists`` if the name is taken.
* ``DELETE /v1/adapters/{name}`` unloads it. With requests of that adapter queued or running it is refused
  at once (409 ``adapter_in_use``), unless ``?wait=SECONDS`` (at most 600) is given: the adapter then takes
  no new requests (they get 404) while the ones in flight finish, and is removed when they have; if they
  have not after that many seconds it is available again and the answer is 409. Unknown name: 404
  ``model_not_found``.

A request naming an adapter that is not loaded gets 404 ``model_not_found`` naming it. Race: an adapter
unloaded between a request's validation and its admission to the engine fails that request with a server
error (the unload itself refuses while requests are in flight, so only that narrow window exists).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request

from llmkit.serve.protocol import APIError, ParsedRequest

log = logging.getLogger(__name__)

MAX_WAIT_S = 600.0


class AdapterService:
    """The server's view of a `MultiLoRA` (`manager`, None when the server runs without one)."""

    def __init__(self, manager, served_name: str, created: int):
        self.manager = manager
        self.served_name = served_name
        self.created = created
        self.closing: set[str] = set()
        """Adapters being unloaded with ?wait: no new requests."""

    # -- requests -------------------------------------------------------------------------------------
    def resolve(self, body: dict) -> str | None:
        """The adapter a request body's ``model`` names ("<served>:<adapter>"), or None for the base. The
        body's model is set to the served name, so the usual model check passes. 404 `model_not_found`
        naming an adapter that is not loaded."""
        model = body.get("model")
        if not isinstance(model, str) or ":" not in model:
            return None
        base, _, adapter = model.rpartition(":")  # adapter names hold no ':'
        if base != self.served_name:
            return None  # the usual check answers: this server does not serve that model
        if self.manager is None or adapter not in self.manager or adapter in self.closing:
            loaded = ", ".join(f"'{self.served_name}:{n}'" for n in self.names()) or "none"
            raise APIError(f"The model '{model}' does not exist: adapter '{adapter}' is not loaded on "
                           f"'{self.served_name}' (loaded adapters: {loaded})", "model", status=404,
                           code="model_not_found")
        body["model"] = self.served_name
        return adapter

    @staticmethod
    def apply(parsed: ParsedRequest, adapter: str | None) -> ParsedRequest:
        """Route every engine request of `parsed` to `adapter`."""
        if adapter is not None:
            for c in parsed.choices:
                c.params.adapter = adapter
            parsed.adapter = adapter
        return parsed

    def model_id(self, parsed: ParsedRequest) -> str:
        """The ``model`` a response names: the adapter's id when the request used one."""
        adapter = getattr(parsed, "adapter", None)
        return self.served_name if adapter is None else f"{self.served_name}:{adapter}"

    def names(self) -> list[str]:
        if self.manager is None:
            return []
        return [n for n in self.manager.names() if n not in self.closing]

    def model_entries(self, max_len: int) -> list[dict]:
        """/v1/models entries of the adapters (vLLM's shape: ``parent`` the base, ``root`` the dir)."""
        out = []
        for name in self.names():
            info = self.manager.adapters.get(name)
            if info is None:
                continue
            out.append({"id": f"{self.served_name}:{name}", "object": "model", "created": self.created,
                        "owned_by": "llmkit", "parent": self.served_name, "root": str(info.path),
                        "max_model_len": max_len})
        return out

    # -- management -----------------------------------------------------------------------------------
    def _entry(self, name: str) -> dict:
        info = self.manager.adapters[name]
        return {"id": f"{self.served_name}:{name}", "object": "adapter", "name": name, "path": str(info.path),
                "bytes": info.bytes, "rank": info.rank, "resident": info.factors is not None,
                "in_flight": info.in_use(), "loads": info.loads}

    def _require(self) -> None:
        if self.manager is None:
            raise APIError("this server applies one adapter to its model (--adapter DIR) and cannot serve "
                           "others beside it; start it without one to load adapters at run time", None,
                           status=400, code="adapters_unavailable")

    def install(self, app: FastAPI, auth: Callable[[Request], None],
                read_body: Callable[[Request], Awaitable[bytes]]) -> None:
        """Add GET/POST /v1/adapters and DELETE /v1/adapters/{name} to `app`; `auth` / `read_body` are the
        app's own (API key, body size limit)."""

        @app.get("/v1/adapters")
        async def list_adapters(request: Request):
            auth(request)
            if self.manager is None:
                return {"object": "list", "data": []}
            return {"object": "list", "data": [self._entry(n) for n in self.names()],
                    "budget_bytes": self.manager.budget_bytes, "resident_bytes": self.manager.resident_bytes()}

        @app.post("/v1/adapters")
        async def load_adapter(request: Request):
            raw = await read_body(request)  # checks the API key first
            self._require()
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise APIError("request body is not valid JSON", None, code="invalid_json") from None
            if not isinstance(body, dict):
                raise APIError("body must be an object {\"name\": ..., \"path\": ...}", None, code="invalid_type")
            for key in ("name", "path"):
                if not isinstance(body.get(key), str) or not body[key]:
                    raise APIError(f"'{key}' is required (a string)", key, code="missing_required_parameter")
            name, path = body["name"], body["path"]
            if name in self.manager or name in self.closing:
                raise APIError(f"adapter '{name}' is already loaded; unload it first", "name", status=409,
                               code="adapter_exists")
            try:
                await asyncio.to_thread(self.manager.register, name, path)
            except (ValueError, FileNotFoundError, OSError) as e:
                if "already loaded" in str(e):
                    raise APIError(str(e), "name", status=409, code="adapter_exists") from None
                log.info("adapter %s refused: %s", name, e)
                raise APIError(f"cannot load adapter '{name}': {e}", "path", code="invalid_adapter") from None
            log.info("adapter %s loaded from %s", name, path)
            return self._entry(name)

        @app.delete("/v1/adapters/{name}")
        async def unload_adapter(name: str, request: Request):
            from llmkit.infer.multi_lora import AdapterInUse, UnknownAdapter

            auth(request)
            self._require()
            wait = request.query_params.get("wait")
            try:
                wait_s = min(float(wait), MAX_WAIT_S) if wait is not None else 0.0
            except ValueError:
                raise APIError(f"'wait' must be a number of seconds, got {wait!r}", "wait",
                               code="invalid_value") from None
            if name not in self.manager or name in self.closing:
                raise APIError(f"adapter '{name}' is not loaded", "name", status=404, code="model_not_found")
            if wait_s > 0:
                self.closing.add(name)
            try:
                end = time.monotonic() + wait_s
                while True:
                    try:
                        self.manager.unregister(name)
                        break
                    except UnknownAdapter:
                        raise APIError(f"adapter '{name}' is not loaded", "name", status=404,
                                       code="model_not_found") from None
                    except AdapterInUse as e:
                        if time.monotonic() >= end:
                            hint = "" if wait_s else "; retry when they finish, or pass ?wait=SECONDS"
                            raise APIError(f"{e}{hint}", "name", status=409, code="adapter_in_use") from None
                    await asyncio.sleep(0.05)
            finally:
                self.closing.discard(name)
            log.info("adapter %s unloaded", name)
            return {"id": f"{self.served_name}:{name}", "object": "adapter", "deleted": True}


def build(model, config, served_name: str, created: int):
    """The `MultiLoRA` for `model` per the server config (None when `config.adapter` merges one adapter into
    the model instead) and its `AdapterService`. The `--adapter name=DIR` adapters are registered by
    `register_startup` once the Engine wrapped the model."""
    from llmkit.infer.multi_lora import MultiLoRA

    adapters = dict(config.adapters or {})
    if config.adapter is not None:
        if adapters:
            raise ValueError("adapter (one adapter applied to the model) and adapters (name=DIR, served side by "
                             "side) cannot be combined: pass every adapter as --adapter NAME=DIR")
        return None, AdapterService(None, served_name, created)
    if config.adapter_budget_mb <= 0:
        raise ValueError(f"adapter_budget_mb: must be > 0, got {config.adapter_budget_mb}")
    manager = MultiLoRA(model, budget_bytes=int(config.adapter_budget_mb * 2**20))
    return manager, AdapterService(manager, served_name, created)


def register_startup(service: AdapterService, adapters: dict[str, str] | None) -> None:
    """Register the adapters given at start-up; ValueError naming the adapter whose dir is unusable."""
    for name, path in (adapters or {}).items():
        try:
            service.manager.register(name, path)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"--adapter {name}={path}: {e}") from None
