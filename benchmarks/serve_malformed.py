"""Malformed and hostile requests against a real `llmkit serve`: no 5xx, and it keeps serving after each.

    python benchmarks/serve_malformed.py                   # starts a server on a tiny random model
    python benchmarks/serve_malformed.py --fuzz 2000 --fuzz-seconds 300   # a longer fuzz run
    python benchmarks/serve_malformed.py --url http://127.0.0.1:8000 --api-key KEY --max-request-bytes N

Sends every case of `CASES` (invalid JSON, wrong types, out-of-range sampling values, a prompt longer than
the context, an oversized body, a missing or wrong API key, unknown paths, wrong methods, a client that
drops a stream, ...) and after each one a valid chat completion, which must still answer 200. Prints one
JSON object: ``cases`` maps each kind to ``{status, param, message, expected, as_expected}`` (``param``
and ``message`` from the OpenAI error body ``{"error": {"message", "type", "param", "code"}}``), plus
``failures`` (a 5xx, an exception, or a server that stopped answering) and ``unexpected`` (a status
outside the case's expected set: worth a look, not a failure). Exits 1 if there is any failure.

Without ``--url`` it starts ``python -m llmkit serve`` with ``--api-key`` and ``--max-request-bytes``
set (so the 401 and 413 cases apply) on a 2-layer random model with a char tokenizer and a 128-token
context. ``max_tokens: 10**9`` is expected to be accepted and clamped to the context left (200 with
finish_reason "length"), as vLLM does; 400 is accepted as well.

Then a bounded fuzz run (``run_fuzz``; loopback servers only unless ``--fuzz-any-host``): ``--fuzz``
random mutations of valid chat and completion requests (fields deleted, set to hostile values of every
JSON type, nested, retyped; raw bytes truncated or spliced), fixed ``--fuzz-seed``, at most
``--fuzz-seconds``, ``--fuzz-concurrency`` at a time, while a witness thread streams a valid greedy
completion back to back. Figures: ``mutations`` sent, ``status_counts``, ``server_errors`` (5xx: must be
0), ``hung`` (no complete answer within ``--timeout``: must be 0), ``broken_streams`` (a 200 stream that
ended in an error chunk or without [DONE]: must be 0), and the witness: ``witness_runs``,
``witness_unharmed`` (same text and completion token count as its run alone before the fuzz: must equal
``witness_runs``). Any 5xx, hang, broken stream or harmed witness makes the exit status 1.

Last, ``stall``: how long a 1 MB prompt list (64 prompts, each too long for the context, so it ends in a
400 after tokenizing) stalls other streams: a witness streams back to back while the big request is
parsed; ``max_gap_during_s`` is the longest pause between two of its chunks while the big request ran,
``max_gap_alone_s`` the same over as long a window before it (needs the server's body limit >= 1 MB).

Importable: ``CASES``, ``run_stall(base_url)``, ``run_suite(base_url, api_key=None, max_request_bytes=...)`` and
``run_fuzz(base_url, api_key=None, n=..., seed=..., max_seconds=...)`` (each returns its report).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

MODEL = "{model}"  # replaced by the served model's id in JSON bodies


@dataclass(frozen=True)
class Case:
    kind: str
    body: Any = None  # a JSON-able object (dumped), bytes (sent as is), or a callable(ctx) -> bytes
    method: str = "POST"
    path: str = "/v1/chat/completions"
    expect: tuple[int, ...] = (400,)
    headers: dict = field(default_factory=dict)
    auth: str = "good"  # good | none | wrong
    needs_key: bool = False  # only meaningful when the server has an API key
    special: str | None = None  # "disconnect": open a stream and drop it


def chat(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **extra}


def completion(**extra) -> dict:
    return {"model": MODEL, "prompt": "hello", "max_tokens": 4, **extra}


CASES: list[Case] = [
    Case("invalid_json", b'{"model": "m", "messages": [{"role": "user", "content": "hi"'),
    Case("non_object_body", b"[1, 2, 3]"),
    Case("json_string_body", b'"hello"'),
    Case("empty_body", b""),
    Case("not_utf8_body", b'{"model": "\xff\xfe", "messages": []}'),
    Case("deeply_nested_json", b"[" * 20_000 + b"]" * 20_000),  # 40 kB: under any body limit, past json's recursion limit
    Case("nan_temperature", b'{"model": "{model}", "messages": [{"role": "user", "content": "hi"}], '
                            b'"temperature": NaN, "max_tokens": 2}'),
    Case("missing_messages", {"model": MODEL, "max_tokens": 4}),
    Case("messages_not_list", chat(messages="hello")),
    Case("messages_empty", chat(messages=[])),
    Case("message_not_object", chat(messages=["hello"])),
    Case("bad_role", chat(messages=[{"role": "wizard", "content": "hi"}])),
    Case("missing_role", chat(messages=[{"content": "hi"}])),
    Case("content_not_string", chat(messages=[{"role": "user", "content": 123}])),
    Case("unknown_model", chat(model="no-such-model"), expect=(404, 400)),
    Case("temperature_string", chat(temperature="hot")),
    Case("temperature_5", chat(temperature=5)),
    Case("temperature_negative", chat(temperature=-1)),
    Case("top_p_0", chat(top_p=0)),
    Case("top_p_2", chat(top_p=2)),
    Case("n_0", chat(n=0)),
    Case("n_100", chat(n=100)),
    Case("max_tokens_negative", chat(max_tokens=-1)),
    Case("max_tokens_zero", chat(max_tokens=0)),
    Case("max_tokens_float", chat(max_tokens=1.5)),
    Case("max_tokens_1e9", chat(max_tokens=10**9), expect=(200, 400)),
    Case("prompt_longer_than_context", chat(messages=[{"role": "user", "content": "hello " * 10_000}])),
    Case("stop_list_of_10", chat(stop=[f"s{i}" for i in range(10)])),
    Case("stop_not_strings", chat(stop=[1, 2])),
    Case("top_logprobs_50", chat(logprobs=True, top_logprobs=50)),
    Case("completions_logprobs_50", completion(logprobs=50), path="/v1/completions"),
    Case("presence_penalty_5", chat(presence_penalty=5)),
    Case("frequency_penalty_string", chat(frequency_penalty="x")),
    Case("stream_not_bool", chat(stream="yes")),
    Case("seed_string", chat(seed="abc")),
    Case("completions_missing_prompt", {"model": MODEL, "max_tokens": 4}, path="/v1/completions"),
    Case("completions_prompt_dict", completion(prompt={"text": "hi"}), path="/v1/completions"),
    Case("completions_token_id_out_of_vocab", completion(prompt=[10**9]), path="/v1/completions"),
    Case("completions_negative_token_id", completion(prompt=[-5, 3]), path="/v1/completions"),
    Case("completions_best_of_100", completion(best_of=100), path="/v1/completions"),
    Case("wrong_content_type", chat(), headers={"Content-Type": "text/plain"}, expect=(415, 400, 200)),
    Case("oversized_body", None, expect=(413,)),  # built from max_request_bytes
    Case("missing_api_key", chat(), auth="none", expect=(401,), needs_key=True),
    Case("wrong_api_key", chat(), auth="wrong", expect=(401,), needs_key=True),
    Case("unknown_path", chat(), path="/v1/no-such-endpoint", expect=(404,)),
    Case("get_on_post_endpoint", None, method="GET", expect=(405,)),
    Case("put_on_models", None, method="PUT", path="/v1/models", expect=(405,)),
    Case("client_disconnects_mid_stream", chat(stream=True, max_tokens=64), expect=(200,), special="disconnect"),
    # values that used to pass validation and make NaN / overflow in sampling (which failed every running
    # request), or to kill the engine thread: now 400, or accepted and harmless
    Case("temperature_1e-40", chat(temperature=1e-40), expect=(200,)),  # below 1e-5: greedy
    Case("repetition_penalty_1e-45", chat(repetition_penalty=1e-45)),
    Case("top_k_2_pow_63", chat(top_k=2 ** 63, temperature=1), expect=(200,)),  # >= vocabulary: off
    Case("prompt_list_failed_prefill_killer", completion(prompt=["word " * 20, "hi"], max_tokens=5,
                                                         temperature=1e-40), path="/v1/completions", expect=(200,)),
    # 500s before: Python's int parser limit, lone surrogates
    Case("max_tokens_5000_digits", b'{"model": "{model}", "messages": [{"role": "user", "content": "hi"}], '
                                   b'"max_tokens": ' + b"9" * 5000 + b"}"),
    Case("surrogate_in_content", b'{"model": "{model}", "messages": [{"role": "user", "content": "\\ud800"}]}'),
    Case("surrogate_in_model", b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}'),
    Case("surrogate_in_prompt", b'{"model": "{model}", "prompt": "a\\udfffb", "max_tokens": 2}',
         path="/v1/completions"),
    Case("surrogate_in_key", b'{"model": "{model}", "prompt": "hi", "\\ud800": 1}', path="/v1/completions"),
    # never admissible (prompts x n above the queue) is 400, not 429 forever; the prompt list is bounded
    Case("prompts_x_n_over_queue", completion(prompt=["hi"] * 40, n=2), path="/v1/completions"),
    Case("prompt_list_65", completion(prompt=["hi"] * 65), path="/v1/completions"),
    # HTTP hygiene: no redirect that reflects the Host header; HEAD for probes
    Case("trailing_slash_post_evil_host", chat(), path="/v1/chat/completions/",
         headers={"Host": "evil.example"}, expect=(404,)),
    Case("head_health", None, method="HEAD", path="/health", expect=(200,)),
    Case("head_index", None, method="HEAD", path="/", expect=(200,)),
]


def _body_bytes(case: Case, model: str, max_request_bytes: int) -> bytes | None:
    if case.kind == "oversized_body":
        pad = "x" * (2 * max_request_bytes + 1024)
        return json.dumps(chat(messages=[{"role": "user", "content": pad}])).replace(MODEL, model).encode()
    if case.body is None:
        return None
    if isinstance(case.body, bytes):
        return case.body.replace(MODEL.encode(), model.encode())
    return json.dumps(case.body).replace(json.dumps(MODEL), json.dumps(model)).encode()


def _error_fields(resp: httpx.Response) -> tuple[Any, Any]:
    try:
        err = resp.json().get("error")
    except (ValueError, AttributeError):
        return None, resp.text[:120] or None
    if isinstance(err, dict):
        return err.get("param"), err.get("message")
    return None, None


def _valid_request(client: httpx.Client, base_url: str, model: str, headers: dict) -> tuple[bool, str]:
    """A valid chat completion answers 200. A transport error on the kept-alive connection is retried once
    on a fresh one, to tell a server that dropped that connection from one that stopped serving."""
    body = {**chat(max_tokens=2), "model": model}
    note = ""
    for attempt in (client, None):
        try:
            if attempt is None:
                with httpx.Client(timeout=60) as fresh:
                    r = fresh.post(base_url + "/v1/chat/completions", json=body, headers=headers)
            else:
                r = attempt.post(base_url + "/v1/chat/completions", json=body, headers=headers)
        except httpx.HTTPError as e:
            note = f"{type(e).__name__}: {e}"
            continue
        ok = r.status_code == 200 and bool(r.json().get("choices"))
        return ok, f"status {r.status_code}" + (f" on a fresh connection after {note}" if note else "")
    return False, note


def run_suite(base_url: str, api_key: str | None = None, max_request_bytes: int = 1 << 20,
              cases: list[Case] | None = None) -> dict:
    """Send every case to `base_url`, each followed by a valid request; the report (see the module doc)."""
    base_url = base_url.rstrip("/")
    good = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: dict[str, dict] = {}
    failures: list[str] = []
    unexpected: list[str] = []
    with httpx.Client(timeout=60) as client:  # no client-wide headers: each case sets its own Authorization
        model = client.get(base_url + "/v1/models", headers=good).json()["data"][0]["id"]
        for case in cases or CASES:
            if case.needs_key and not api_key:
                results[case.kind] = {"skipped": "the server has no API key"}
                continue
            headers = {"Content-Type": "application/json", **good, **case.headers}
            if case.auth == "none":
                headers.pop("Authorization", None)
            elif case.auth == "wrong":
                headers["Authorization"] = "Bearer wrong-key"
            content = _body_bytes(case, model, max_request_bytes)
            row: dict[str, Any] = {"expected": list(case.expect)}
            try:
                if case.special == "disconnect":
                    with client.stream(case.method, base_url + case.path, content=content, headers=headers) as r:
                        row["status"] = r.status_code
                        for _ in r.iter_lines():
                            break  # read one line, then close the connection mid-stream
                    row.update(param=None, message="closed after the first line")
                else:
                    r = client.request(case.method, base_url + case.path, content=content, headers=headers)
                    row["status"] = r.status_code
                    row["param"], row["message"] = _error_fields(r) if case.method != "HEAD" else (None, None)
                    location = r.headers.get("location")
                    if location and urllib.parse.urlsplit(location).netloc not in ("", urllib.parse.urlsplit(
                            base_url).netloc):
                        failures.append(f"{case.kind}: redirects to another host ({location})")
                    if r.status_code == 200 and case.kind == "max_tokens_1e9":
                        ch = r.json()["choices"][0]
                        row["message"] = (f"accepted: finish_reason {ch.get('finish_reason')!r}, "
                                          f"{r.json().get('usage', {}).get('completion_tokens')} tokens")
            except httpx.HTTPError as e:
                row.update(status=None, param=None, message=f"{type(e).__name__}: {e}")
                failures.append(f"{case.kind}: no response ({type(e).__name__})")
            status = row.get("status")
            row["as_expected"] = status in case.expect
            if status is not None and status >= 500:
                failures.append(f"{case.kind}: {status}")
            elif status is not None and not row["as_expected"]:
                unexpected.append(f"{case.kind}: {status} (expected {'/'.join(map(str, case.expect))})")
            alive, why = _valid_request(client, base_url, model, good)
            row["server_still_serving"] = alive
            if not alive:
                failures.append(f"after {case.kind}: a valid request failed ({why})")
            elif "fresh connection" in why:
                failures.append(f"after {case.kind}: the server dropped the kept-alive connection ({why})")
            results[case.kind] = row
    return {"base_url": base_url, "n_cases": len(results), "cases": results, "failures": failures,
            "unexpected": unexpected, "ok": not failures}


# -- fuzzing ----------------------------------------------------------------------------------------

HOSTILE_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 2, 7, 9, 65, 10 ** 9, 2 ** 31, 2 ** 63, -(2 ** 63) - 1, 10 ** 4000, 0.5, 1e-40,
    1e-45, -1e-40, 1e308, -1e308, 3.0, -2.5, "", "hi", "\x00", "x" * 2000, "\u202e\u2066", "<|end|>",
    "\ud800", "\udfff" * 3, "\U0001f600", [], [[]], [1, 2], [-1], ["a"] * 70, {}, {"a": {"b": []}},
    [{"role": "user"}], [{"role": "user", "content": ["x"]}], [{"type": "text", "text": 5}],
]
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "top_k", "min_p", "n", "seed", "stop", "stream", "stream_options", "logprobs", "top_logprobs",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "echo", "best_of", "user", "\ud800"]


def _mutate(rng: random.Random, body: dict) -> dict | bytes:
    """One random mutation of a valid request body: 1-3 field edits, sometimes a raw-bytes edit on top."""
    body = json.loads(json.dumps(body))
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        field_name = rng.choice(FIELDS)
        if op < 0.15 and body:
            body.pop(rng.choice(list(body)), None)
        elif op < 0.75:
            body[field_name] = rng.choice(HOSTILE_VALUES)
        elif op < 0.85 and isinstance(body.get("messages"), list) and body["messages"]:
            msg = body["messages"][0] if isinstance(body["messages"][0], dict) else {}
            msg[rng.choice(["role", "content", "name", "\ud800"])] = rng.choice(HOSTILE_VALUES)
            body["messages"][0] = msg
        elif op < 0.92:
            body[field_name] = [rng.choice(HOSTILE_VALUES) for _ in range(rng.randint(1, 4))]
        else:
            body[field_name] = {"nested": rng.choice(HOSTILE_VALUES)}
    raw = json.dumps(body).encode()
    r = rng.random()
    if r < 0.05:
        return raw[:rng.randint(0, len(raw))]  # truncated
    if r < 0.10:
        i = rng.randint(0, len(raw))
        return raw[:i] + bytes([rng.randint(0, 255)]) + raw[i:]  # a stray byte
    if r < 0.13:
        return re.sub(rb"\d+", b"9" * 5000, raw, count=1)  # an integer literal past Python's digit limit
    return body


def _send(client: httpx.Client, base_url: str, path: str, body, headers: dict, timeout: float) -> dict:
    """POST one (mutated) request and read the whole answer. -> {status, outcome}; outcome is "ok", "hung",
    "broken_stream" (200 stream ending in an error chunk or without [DONE]) or "transport_error"."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    stream = isinstance(body, dict) and body.get("stream") is True
    try:
        with client.stream("POST", base_url + path, content=content, headers=headers, timeout=timeout) as r:
            if r.status_code != 200 or not stream:
                r.read()
                return {"status": r.status_code, "outcome": "ok"}
            last = None
            for ln in r.iter_lines():
                if ln.startswith("data: "):
                    last = ln[6:]
            ok = last == "[DONE]"
            return {"status": 200, "outcome": "ok" if ok else "broken_stream", "last": None if ok else last}
    except httpx.TimeoutException:
        return {"status": None, "outcome": "hung"}
    except httpx.HTTPError as e:
        return {"status": None, "outcome": "transport_error", "detail": f"{type(e).__name__}: {e}"}


def _witness(client: httpx.Client, base_url: str, model: str, headers: dict, timeout: float) -> tuple[str, int]:
    """A valid greedy streaming completion: (its text, its completion tokens from the usage chunk)."""
    body = {"model": model, "prompt": "hello world", "max_tokens": 48, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    text, tokens, done = "", -1, False
    with client.stream("POST", base_url + "/v1/completions", json=body, headers=headers, timeout=timeout) as r:
        if r.status_code != 200:
            return f"status {r.status_code}", -1
        for ln in r.iter_lines():
            if ln == "data: [DONE]":
                done = True
            elif ln.startswith("data: "):
                ch = json.loads(ln[6:])
                if ch.get("choices"):
                    text += ch["choices"][0].get("text") or ""
                    if ch["choices"][0].get("finish_reason") not in (None, "stop", "length"):
                        return "finish_reason " + str(ch["choices"][0]["finish_reason"]), -1
                if ch.get("usage"):
                    tokens = ch["usage"]["completion_tokens"]
    return (text, tokens) if done else ("no [DONE]", -1)


def run_fuzz(base_url: str, api_key: str | None = None, n: int = 500, seed: int = 0, max_seconds: float = 120.0,
             concurrency: int = 4, timeout: float = 30.0, allow_remote: bool = False) -> dict:
    """Send up to `n` mutated requests (seeded, at most `max_seconds`) while a witness stream runs; the
    report described in the module doc."""
    host = urllib.parse.urlsplit(base_url).hostname
    if not allow_remote and host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"fuzzing {host}: only loopback servers unless allow_remote (--fuzz-any-host)")
    base_url = base_url.rstrip("/")
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    rng = random.Random(seed)
    with httpx.Client(timeout=timeout) as c:
        model = c.get(base_url + "/v1/models", headers=headers).json()["data"][0]["id"]
        baseline = _witness(c, base_url, model, headers, timeout)
    seeds = [(chat(max_tokens=8), "/v1/chat/completions"), (completion(max_tokens=8), "/v1/completions"),
             (chat(max_tokens=8, stream=True), "/v1/chat/completions"),
             (completion(prompt=["hello", "world"], n=2, max_tokens=8, stream=True), "/v1/completions")]
    jobs = []
    for _ in range(n):
        body, path = rng.choice(seeds)
        body = json.loads(json.dumps(body).replace(json.dumps(MODEL), json.dumps(model)))
        if rng.random() < 0.1:  # sometimes the wrong endpoint for the shape
            path = "/v1/completions" if path.endswith("chat/completions") else "/v1/chat/completions"
        jobs.append((path, _mutate(rng, body)))

    stop = threading.Event()
    witness = {"runs": 0, "unharmed": 0, "harmed": []}

    def witness_loop():
        with httpx.Client(timeout=timeout) as wc:
            while not stop.is_set():
                got = _witness(wc, base_url, model, headers, timeout)
                witness["runs"] += 1
                if got == baseline:
                    witness["unharmed"] += 1
                else:
                    witness["harmed"].append(str(got)[:200])

    results: list[dict] = []
    start = time.monotonic()
    wt = threading.Thread(target=witness_loop, daemon=True)
    wt.start()
    with httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=concurrency)) as client, \
            ThreadPoolExecutor(concurrency) as pool:
        def one(job):
            if time.monotonic() - start > max_seconds:
                return None
            path, body = job
            return {**_send(client, base_url, path, body, headers, timeout), "path": path,
                    "body": (body if isinstance(body, bytes) else json.dumps(body).encode())[:300]}

        results = [r for r in pool.map(one, jobs) if r is not None]
    stop.set()
    wt.join(timeout=timeout + 5)
    elapsed = time.monotonic() - start
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    bad = [r for r in results if (r["status"] or 0) >= 500 or r["outcome"] != "ok"]
    report = {
        "mutations": len(results), "seed": seed, "seconds": round(elapsed, 1), "status_counts": statuses,
        "server_errors": sum(1 for r in results if (r["status"] or 0) >= 500),
        "hung": sum(1 for r in results if r["outcome"] == "hung"),
        "broken_streams": sum(1 for r in results if r["outcome"] == "broken_stream"),
        "transport_errors": sum(1 for r in results if r["outcome"] == "transport_error"),
        "witness_tokens": baseline[1], "witness_runs": witness["runs"], "witness_unharmed": witness["unharmed"],
        "witness_harmed_samples": witness["harmed"][:3],
        "failure_samples": [{k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
                             for k, v in r.items()} for r in bad[:5]],
    }
    report["ok"] = (not bad and baseline[1] > 0 and witness["runs"] > 0
                    and witness["unharmed"] == witness["runs"])
    return report


def run_stall(base_url: str, api_key: str | None = None, prompts: int = 64, chars: int = 15_000) -> dict:
    """Longest pause of back-to-back witness streams while a `prompts` x `chars` prompt list is parsed."""
    base_url = base_url.rstrip("/")
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    big = json.dumps({"prompt": ["hello world "[i % 12] * chars for i in range(prompts)], "max_tokens": 1})
    stamps: list[float] = []
    stop = threading.Event()

    def witness():
        body = {"prompt": "hello", "max_tokens": 48, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                with c.stream("POST", base_url + "/v1/completions", json=body, headers=headers) as r:
                    for ln in r.iter_lines():
                        if ln.startswith("data: "):
                            stamps.append(time.perf_counter())

    t = threading.Thread(target=witness, daemon=True)
    t.start()
    time.sleep(1.0)
    with httpx.Client(timeout=120) as c:
        t0 = time.perf_counter()
        r = c.post(base_url + "/v1/completions", content=big.encode(), headers=headers)
        t1 = time.perf_counter()
    time.sleep(0.2)
    stop.set()
    t.join(timeout=60)

    def max_gap(lo: float, hi: float) -> float:
        gaps = [b - a for a, b in zip(stamps, stamps[1:]) if b >= lo and a <= hi]
        return round(max(gaps), 4) if gaps else float("nan")

    return {"body_bytes": len(big), "status": r.status_code, "big_request_s": round(t1 - t0, 3),
            "max_gap_during_s": max_gap(t0, t1), "max_gap_alone_s": max_gap(t0 - (t1 - t0), t0),
            "witness_chunks": len(stamps)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model(out: Path) -> Path:
    import torch

    from llmkit.chat import chat_template_for, save_chat_template
    from llmkit.models import Decoder, DecoderConfig, save_model
    from llmkit.tokenizer import train_char

    torch.manual_seed(0)
    text = "hello world, ROMEO: and JULIET. abcdefghijklmnopqrstuvwxyz\n"
    tok = train_char([text])
    model = Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, d_model=32,
                                  n_head=2)).eval()
    with torch.no_grad():  # specials (ids after the characters) get logit 0: a random model keeps talking
        model.lm_head.weight[len(set(text)):] = 0
    save_model(model, out, tok)
    save_chat_template(out, chat_template_for(tok))  # so /v1/chat/completions accepts it
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=None, help="a running server (default: start one on a tiny random model)")
    ap.add_argument("--api-key", default=None, help="the server's API key (enables the 401 cases)")
    ap.add_argument("--max-request-bytes", type=int, default=1 << 20,
                    help="the server's body limit: the oversized case sends twice as much")
    ap.add_argument("--fuzz", type=int, default=500, help="mutated requests to send (0: no fuzz run)")
    ap.add_argument("--fuzz-seed", type=int, default=0)
    ap.add_argument("--fuzz-seconds", type=float, default=120.0, help="the fuzz run stops sending after this")
    ap.add_argument("--fuzz-concurrency", type=int, default=4)
    ap.add_argument("--fuzz-any-host", action="store_true", help="allow fuzzing a non-loopback --url")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds before a request counts as hung")
    args = ap.parse_args(argv)
    proc = None
    tmp = tempfile.TemporaryDirectory(prefix="llmkit-serve-malformed-")
    try:
        url, key, limit = args.url, args.api_key, args.max_request_bytes
        if url is None:
            key, limit = "sk-malformed-test", 1 << 20
            port = _free_port()
            model = _tiny_model(Path(tmp.name) / "model")
            log_path = Path(tmp.name) / "server.log"
            argv_ = [sys.executable, "-m", "llmkit", "serve", "--model", str(model), "--host", "127.0.0.1",
                     "--port", str(port), "--api-key", key, "--max-request-bytes", str(limit)]
            proc = subprocess.Popen(argv_, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    print(log_path.read_text()[-3000:], file=sys.stderr)
                    return 2
                try:
                    with urllib.request.urlopen(url + "/health", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.2)
        report = run_suite(url, key, limit)
        if args.fuzz > 0:
            report["fuzz"] = run_fuzz(url, key, n=args.fuzz, seed=args.fuzz_seed, max_seconds=args.fuzz_seconds,
                                      concurrency=args.fuzz_concurrency, timeout=args.timeout,
                                      allow_remote=args.fuzz_any_host)
            report["ok"] = report["ok"] and report["fuzz"]["ok"]
        if limit >= 1 << 20:
            report["stall"] = run_stall(url, key)
        print(json.dumps(report, indent=1))
        return 0 if report["ok"] else 1
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
