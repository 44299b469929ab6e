"""`EngineRunner`: the one thread that drives the (not thread-safe) inference `Engine` for the server.

HTTP handlers run on the asyncio event loop and never touch the engine. They `submit` requests and
`cancel` them through an inbox (a list under a `threading.Condition`); the engine thread drains the inbox
at the top of every iteration, steps the engine while any request is waiting or running, and sleeps on the
condition when idle (no busy polling). Tokens travel back per request to the submitter's `asyncio.Queue`
through `loop.call_soon_threadsafe`, as events:

* ``("token", index, token_id, logprob_entry)``: logprob_entry is ``(token_id, logprob, [(id, logprob)])``
  or None;
* ``("done", index, info)``: info = {finish_reason ('stop' | 'length' | 'cancelled'), text (the reply cut
  before a stop string, or None), prompt_tokens, completion_tokens, cached_tokens};
* ``("error", index, message)``: the message is safe to show a client (no exception text: that is logged).

Admission is bounded: at most `max_queue` engine requests may wait for a cache slot (submitted, not yet
running); more raise `QueueFull` (HTTP 429). Shutdown: `drain(grace)` stops admission (`Draining`, HTTP
503) and cancels whatever is still running `grace` seconds later; `stop()` cancels the rest and joins.

Failures, narrowest first: a request whose logits turn NaN/inf ends alone with an error (the engine's
finish_reason 'error'); a failed engine step fails the requests it was running and the thread goes on;
`MAX_CONSECUTIVE_STEP_FAILURES` failed steps in a row (a broken device, say) or any error outside a step
end the thread. A dead thread never hangs a client: every queued and running request gets an error event,
`submit` raises `EngineDown` (HTTP 503), and `on_fatal(exc)` is called so the server can exit non-zero and
be restarted by its supervisor.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from llmkit.infer.multi_lora import UnknownAdapter

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More than `max_queue` requests would wait for a slot."""


class Draining(Exception):
    """The runner is shutting down and takes no new requests."""


class EngineDown(Exception):
    """The engine thread has died; the runner takes no new requests."""


MAX_CONSECUTIVE_STEP_FAILURES = 3
"""Engine steps failing back to back before the engine is declared dead (one failure is a request's or a
transient problem; a run of them is a broken engine that only a restart can fix)."""
STEP_FAILED = "internal error while generating; the request was not completed"
ENGINE_DOWN = "the inference engine stopped; the server is restarting"


@dataclass
class _Sub:
    request_id: str
    index: int
    prompt: list[int]
    params: object
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class EngineRunner:
    """Owns an `llmkit.infer.engine.Engine` in a dedicated daemon thread.

    engine: the Engine (only this runner's thread calls it after `start`).
    max_queue: most engine requests waiting for a slot before `submit` raises `QueueFull`.
    on_fatal: called once, from the engine thread, with the exception that ended the thread (after every
    request got its error); default: nothing beyond the log.
    """

    def __init__(self, engine, max_queue: int = 64, on_fatal=None):
        self.engine = engine
        self.max_queue = max_queue
        self.on_fatal = on_fatal
        self._dead = False
        self._cond = threading.Condition()
        self._inbox: list[tuple[str, object]] = []  # ("submit", _Sub) | ("cancel", request_id)
        self._queued = 0  # submitted and not yet running (inbox + engine.waiting)
        self._subs: dict[str, _Sub] = {}  # engine-thread only: active requests
        self._active: set[str] = set()  # under the lock: ids submitted and not finished
        self._draining = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._cancel_timer: threading.Timer | None = None
        self._stats = {"running": 0, "waiting": 0, "prefix_hits": 0, "prefix_misses": 0}
        self.finished_log: deque[tuple[str, str]] = deque(maxlen=1024)
        """(request id, finish_reason) of recently finished engine requests, newest last."""
        self.error: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llmkit-engine", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._dead

    @property
    def dead(self) -> bool:
        """True once the engine thread has failed (not after a clean `stop`)."""
        return self._dead

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self, grace: float) -> None:
        """Stop accepting; cancel the requests still running after `grace` seconds (non-blocking)."""
        with self._cond:
            if self._draining:
                return
            self._draining = True
        self._cancel_timer = threading.Timer(grace, self.cancel_all)
        self._cancel_timer.daemon = True
        self._cancel_timer.start()

    def wait_idle(self, timeout: float) -> bool:
        """Block until no request is active or `timeout` seconds pass; True if idle."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._active:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def stop(self, grace: float = 0.0) -> None:
        """Graceful stop: no new requests, in-flight ones get up to `grace` seconds, then are cancelled
        (their streams end with finish_reason 'cancelled'); the engine thread is joined."""
        with self._cond:
            self._draining = True
        self.wait_idle(grace)
        self.cancel_all()
        self.wait_idle(5.0)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._cancel_timer is not None:
            self._cancel_timer.cancel()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- called from the event loop ----------------------------------------------------------------
    def submit(self, items: Sequence[tuple[str, int, list[int], object]], queue: asyncio.Queue) -> None:
        """Queue engine requests (request_id, choice index, prompt ids, RequestParams) whose events go to
        `queue`; all or none are admitted. Call from the event loop thread.

        Raises Draining when shutting down, QueueFull when more than `max_queue` would wait.
        """
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._dead:
                raise EngineDown(ENGINE_DOWN)
            if self._draining or self._stopping:
                raise Draining("the server is shutting down")
            if self._queued + len(items) > self.max_queue:
                raise QueueFull(f"{self._queued} requests are waiting (max_queue={self.max_queue})")
            for rid, index, prompt, params in items:
                self._inbox.append(("submit", _Sub(rid, index, prompt, params, loop, queue)))
                self._active.add(rid)
            self._queued += len(items)
            self._cond.notify_all()

    def cancel(self, request_ids: Sequence[str]) -> None:
        """Cancel requests (any thread): each frees its cache slot at the engine's next iteration."""
        with self._cond:
            self._inbox.extend(("cancel", rid) for rid in request_ids)
            self._cond.notify_all()

    def cancel_all(self) -> None:
        with self._cond:
            self._inbox.extend(("cancel", rid) for rid in list(self._active))
            self._cond.notify_all()

    def stats(self) -> dict:
        """running, waiting (incl. not yet admitted to the engine), kv_slots_used / kv_slots_total (cache
        slots = max_batch), prefix_hits / prefix_misses (blocks), active (unfinished requests), and with
        served LoRA adapters `adapters` (`MultiLoRA.stats()`)."""
        with self._cond:
            s = dict(self._stats)
            s["waiting"] = self._queued
            s["active"] = len(self._active)
        s["kv_slots_used"] = s["running"]
        s["kv_slots_total"] = self.engine.max_batch
        if getattr(self.engine, "adapters", None) is not None:
            s["adapters"] = self.engine.adapters.stats()
        return s

    # -- the engine thread ---------------------------------------------------------------------------
    def _emit(self, sub: _Sub, event: tuple) -> None:
        try:
            sub.loop.call_soon_threadsafe(sub.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody listens any more
            pass

    def _on_token(self, rid: str, token: int) -> None:
        sub = self._subs.get(rid)
        if sub is None:
            return
        req = self.engine.requests.get(rid)
        entry = None
        if req is not None and req.logprobs:
            lp, top = req.logprobs[-1]
            entry = (token, lp, top)
        self._emit(sub, ("token", sub.index, token, entry))

    def _loop(self) -> None:
        try:
            self._serve_requests()
        except BaseException as e:  # noqa: BLE001 - whatever ends the thread must not leave clients hanging
            self._die(e)

    def _die(self, exc: BaseException) -> None:
        """The engine thread is ending on `exc`: refuse new work, send an error to every request still
        queued or running, then tell the server (`on_fatal`)."""
        log.critical("engine thread died; failing every request", exc_info=exc)
        self.error = exc
        with self._cond:
            self._dead = True
            pending = [item for kind, item in self._inbox if kind == "submit"]
            self._inbox = []
            self._active.clear()
            self._queued = 0
            self._stats.update(running=0)
            self._cond.notify_all()
        for sub in pending + list(self._subs.values()):
            self._emit(sub, ("error", sub.index, ENGINE_DOWN))
        self._subs.clear()
        if self.on_fatal is not None:
            try:
                self.on_fatal(exc)
            except Exception:  # noqa: BLE001
                log.exception("on_fatal callback failed")

    def _serve_requests(self) -> None:
        eng = self.engine
        failures = 0  # engine steps failed back to back
        while True:
            with self._cond:
                while not self._inbox and not eng.has_unfinished() and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._inbox:
                    break
                items, self._inbox = self._inbox, []
            for kind, item in items:
                if kind == "submit":
                    self._add(item)
                elif item in eng.requests:
                    eng.cancel(item)
            if eng.has_unfinished():
                try:
                    eng.step()
                    failures = 0
                except Exception as e:  # a model failure: fail the requests in the engine, keep serving
                    failures += 1
                    log.exception("engine step failed (%d in a row)", failures)
                    self.error = e
                    for rid in list(eng.requests):
                        eng.cancel(rid)
                        sub = self._subs.pop(rid, None)
                        if sub is not None:
                            self._emit(sub, ("error", sub.index, STEP_FAILED))
                    if failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                        raise RuntimeError(f"{failures} engine steps failed in a row") from e
            self._finish(eng.pop_finished())
        for rid in list(eng.requests):  # stopped with work left (should not happen after stop())
            eng.cancel(rid)
        self._finish(eng.pop_finished())

    def _add(self, sub: _Sub) -> None:
        try:
            self.engine.add_request(sub.prompt, sub.params, sub.request_id, on_token=self._on_token)
        except UnknownAdapter as e:  # unloaded between the request's validation and its turn here
            self._emit(sub, ("error", sub.index, f"{e}: it was unloaded before this request started"))
            with self._cond:
                self._active.discard(sub.request_id)
            return
        except Exception:  # noqa: BLE001 - the request is refused, the engine is untouched
            log.exception("engine refused request %s", sub.request_id)
            self._emit(sub, ("error", sub.index, STEP_FAILED))
            with self._cond:
                self._active.discard(sub.request_id)
            return
        self._subs[sub.request_id] = sub

    def _finish(self, done) -> None:
        for req in done:
            sub = self._subs.pop(req.request_id, None)
            self.finished_log.append((req.request_id, req.finish_reason))
            if sub is not None and req.finish_reason == "error":
                log.warning("request %s failed alone: %s", req.request_id, req.error)
                self._emit(sub, ("error", sub.index, f"generation failed: {req.error}"))
            elif sub is not None:
                self._emit(sub, ("done", sub.index, {
                    "finish_reason": req.finish_reason, "text": req.text, "prompt_tokens": len(req.prompt),
                    "completion_tokens": len(req.output), "cached_tokens": req.cached_tokens}))
        eng = self.engine
        pc = eng.prefix_cache
        with self._cond:
            for req in done:
                self._active.discard(req.request_id)
            self._queued = len(eng.waiting) + sum(1 for k, _ in self._inbox if k == "submit")
            self._stats.update(running=len(eng.running), prefix_hits=pc.hits, prefix_misses=pc.misses)
            if done:
                self._cond.notify_all()
