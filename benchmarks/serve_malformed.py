"""Malformed and hostile requests against a real `llmkit serve`: no 5xx, and it keeps serving after each.

    python benchmarks/serve_malformed.py                   # starts a server on a tiny random model
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

Importable: ``CASES`` and ``run_suite(base_url, api_key=None, max_request_bytes=...)`` (returns the report).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
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
                    row["param"], row["message"] = _error_fields(r)
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
    args = ap.parse_args(argv)
    proc = None
    tmp = tempfile.TemporaryDirectory(prefix="llmkit-serve-malformed-")
    try:
        url, key, limit = args.url, args.api_key, args.max_request_bytes
        if url is None:
            key, limit = "sk-malformed-test", 65536
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
