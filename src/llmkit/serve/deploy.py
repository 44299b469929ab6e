"""N `llmkit serve` replicas behind one nginx on a single machine, without root and without system files.

`deploy` (CLI: ``llmkit deploy``) is a small process supervisor:

1. it starts ``replicas`` processes of ``python -m llmkit serve --model DIR --host 127.0.0.1 --port P`` on
   consecutive ports ``base_port, base_port + 1, ...`` (default ``port + 1, ...``), each writing its own
   log ``RUN_DIR/replica-<i>.log``; unless ``OMP_NUM_THREADS`` is already set, each replica gets
   ``cpu_count // replicas`` intra-op threads so N replicas do not oversubscribe the cores;
2. it waits for every replica's ``GET /health`` to answer 200 (a replica that exits first is an error,
   reported with the tail of its log);
3. it writes ``RUN_DIR/nginx.conf`` (`nginx_config`) and runs ``nginx -p RUN_DIR -c nginx.conf -e
   logs/error.log`` in the foreground (``daemon off``) as its own child: every path nginx writes (pid
   file, logs, temp directories) lies inside ``RUN_DIR``, so it runs as an ordinary user beside (not
   instead of) a system nginx;
4. it prints the URL and supervises: every ``poll_s`` it checks its children; a replica that exited is
   started again on the same port (with a back-off of 1, 2, 4 ... 30 s between restarts of the same
   replica, reset once it has stayed up a minute); nginx keeps sending its requests to the other replicas
   meanwhile (connection refused is an ``error`` that nginx retries on the next upstream, and after
   ``max_fails`` of them the replica is left out for ``fail_timeout``). An nginx that exited is restarted
   the same way. The supervisor does not probe /health after start-up: a hung-but-alive replica is
   nginx's passive health check's business (``timeout`` counts as a failure), or Kubernetes' liveness
   probe's in a cluster (deploy/kubernetes/llmkit.yaml);
5. on SIGINT or SIGTERM it stops everything gracefully: SIGQUIT to nginx (stop accepting, finish the
   requests in flight) and SIGTERM to the replicas (each drains: /health turns 503, running requests
   finish within its ``--shutdown-grace``), waits ``stop_timeout`` seconds, then SIGKILLs whatever is
   left.

`nginx_config` documents the choices of the generated configuration (least_conn, passive health checks,
which failures are retried on another replica and why POSTs may be, streaming without buffering, upstream
keep-alive).
"""

from __future__ import annotations

import dataclasses
import http.client
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["DeployConfig", "Deployment", "deploy", "find_nginx", "kubernetes_manifest_path",
           "nginx_config", "prepare_run_dir", "run_deploy"]

log = logging.getLogger(__name__)

#: where Debian, Alpine and Homebrew put the binary when it is not on PATH (sbin is often missing for users)
_NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/bin/nginx", "/opt/homebrew/bin/nginx")


def find_nginx(explicit: str | None = None) -> str | None:
    """Path of the nginx binary: `explicit`, else ``nginx`` on PATH, else the usual sbin locations."""
    if explicit:
        return explicit if (shutil.which(explicit) or Path(explicit).is_file()) else None
    found = shutil.which("nginx")
    if found:
        return found
    return next((p for p in _NGINX_CANDIDATES if os.access(p, os.X_OK)), None)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{int(port)}" if ":" in host else f"{host}:{int(port)}"  # IPv6 literals in brackets


def nginx_config(upstreams: Sequence[tuple[str, int]], listen_port: int, *, listen_host: str = "127.0.0.1",
                 client_max_body_size: str = "8m", max_fails: int = 3, fail_timeout_s: int = 10,
                 keepalive: int = 32, upstream_keepalive_timeout_s: int = 4, read_timeout_s: int = 3600,
                 connect_timeout_s: int = 5, next_upstream_tries: int | None = None,
                 retry_non_idempotent: bool = True, worker_processes: int | str = 1,
                 worker_connections: int = 1024) -> str:
    """An nginx configuration balancing `upstreams` (``(host, port)`` pairs) on ``listen_host:listen_port``.

    Every path is relative to nginx's prefix (``nginx -p RUN_DIR``): pid file, logs and the temp
    directories are inside the run directory, so a non-root user runs it; pass ``-e logs/error.log`` too
    (nginx opens its compiled-in error log before reading the configuration otherwise). ``daemon off``:
    the caller owns the process.

    Choices:

    * ``least_conn``: a streamed completion holds its connection for its whole generation, so the number
      of open connections is the best cheap proxy for a replica's load (round robin would pile long
      generations on one replica).
    * passive health checks: ``max_fails`` failed attempts within ``fail_timeout_s`` take a replica out
      for ``fail_timeout_s``; a failure is what `proxy_next_upstream` lists (a refused connection, a
      timeout, a 503 from a draining replica). 429 is deliberately *not* listed: a full queue is back
      pressure, not a fault; counting it would eject every busy replica and turn load into
      "no live upstreams" 502s. The 429 (with its Retry-After) reaches the client.
    * ``proxy_next_upstream error timeout http_503 non_idempotent``: the completion endpoints are POSTs,
      which nginx never re-sends once the request reached an upstream unless ``non_idempotent`` is given.
      Generating is free of side effects, so re-sending is safe; the cost is at most a duplicated
      generation when a replica died mid-request. A refused connection is retried even without it. Retries
      only happen before the first response byte reached the client: a stream cut by a crash stays cut
      (the client sees no ``data: [DONE]``). ``proxy_next_upstream_tries`` bounds the attempts (default:
      the number of upstreams). Pass ``retry_non_idempotent=False`` to retry POSTs only when the upstream
      never received them.
    * streaming: ``proxy_buffering off`` (each SSE chunk is forwarded as the replica writes it),
      ``proxy_cache off``, ``gzip off``, ``proxy_read_timeout`` long (the time *between* two reads: a long
      prefill must not cut the connection).
    * keep-alive to the replicas: ``proxy_http_version 1.1`` with an empty ``Connection`` header and an
      upstream ``keepalive`` pool; its idle timeout (4 s) is below uvicorn's 5 s keep-alive so nginx never
      reuses a connection the replica is closing.
    * request bodies: ``client_max_body_size`` rejects larger bodies with 413 at the proxy; bodies are
      buffered in memory (``client_body_buffer_size`` is the same size) so a retry can resend them and no
      temp file is written (worker processes may run as another user than the run directory's owner).
    * ``X-Upstream`` on every response names the replica that answered; the access log records it with
      the upstream's status and response time.
    """
    if not upstreams:
        raise ValueError("nginx_config: at least one upstream (host, port) is needed")
    tries = next_upstream_tries if next_upstream_tries is not None else len(upstreams)
    servers = "\n".join(f"        server {_hostport(h, p)} max_fails={max_fails} fail_timeout={fail_timeout_s}s;"
                        for h, p in upstreams)
    retry = "error timeout http_503" + (" non_idempotent" if retry_non_idempotent else "")
    return f"""# Generated by llmkit.serve.deploy.nginx_config: run with
#   nginx -p RUN_DIR -c nginx.conf -e logs/error.log
# every path below is relative to RUN_DIR (the prefix).
daemon off;
master_process on;
worker_processes {worker_processes};
pid nginx.pid;
error_log logs/error.log warn;

events {{
    worker_connections {worker_connections};
}}

http {{
    default_type application/json;
    access_log off;
    log_format llmkit '$remote_addr [$time_local] "$request" $status $body_bytes_sent '
                      'rt=$request_time upstream=$upstream_addr ustatus=$upstream_status '
                      'urt=$upstream_response_time rid=$request_id';
    client_body_temp_path tmp/client_body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    server_tokens off;
    sendfile off;
    tcp_nodelay on;
    keepalive_timeout 65s;

    upstream llmkit {{
        least_conn;
{servers}
        keepalive {keepalive};
        keepalive_timeout {upstream_keepalive_timeout_s}s;
    }}

    server {{
        listen {_hostport(listen_host, listen_port)};
        access_log logs/access.log llmkit;

        client_max_body_size {client_max_body_size};
        client_body_buffer_size {client_max_body_size};

        # nginx's own liveness, independent of the replicas
        location = /nginx-health {{
            access_log off;
            default_type text/plain;
            return 200 "ok\\n";
        }}

        location / {{
            proxy_pass http://llmkit;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Request-Id $request_id;

            # streaming: forward SSE chunks as they come, never cache or compress them
            proxy_buffering off;
            proxy_cache off;
            gzip off;
            proxy_connect_timeout {connect_timeout_s}s;
            proxy_send_timeout {read_timeout_s}s;
            proxy_read_timeout {read_timeout_s}s;

            # failover before the first byte reached the client; POSTs included (generation has no side effects)
            proxy_next_upstream {retry};
            proxy_next_upstream_tries {tries};
            proxy_next_upstream_timeout {connect_timeout_s * max(1, tries)}s;

            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
"""


def prepare_run_dir(run_dir: str | Path) -> Path:
    """Create `run_dir` with the ``logs/`` and ``tmp/`` folders the generated configuration writes into."""
    run = Path(run_dir).resolve()
    for sub in ("logs", "tmp"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    return run


def kubernetes_manifest_path() -> Path | None:
    """deploy/kubernetes/llmkit.yaml of the source checkout this module runs from, if there is one."""
    path = Path(__file__).resolve().parents[3] / "deploy" / "kubernetes" / "llmkit.yaml"
    return path if path.is_file() else None


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError, http.client.HTTPException):
        # HTTPException: e.g. BadStatusLine from a TCP self-connect while nothing listens on the port yet
        return None


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@dataclass
class _Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: str | None = None
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_start: float = 0.0
    backoff_s: float = 1.0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            out.flush()
            # own session: a Ctrl-C in the terminal reaches the supervisor only, which stops children in order
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, cwd=self.cwd, start_new_session=True)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass


@dataclass
class Deployment:
    """The processes of one `deploy`: replicas (``replicas[i].proc``, port ``ports[i]``) and nginx."""

    run_dir: Path
    url: str
    ports: list[int]
    replica_host: str
    replicas: list[_Child] = field(default_factory=list)
    nginx: _Child | None = None
    config_path: Path | None = None
    stopping: bool = False
    events: list[str] = field(default_factory=list)

    def note(self, msg: str) -> None:
        self.events.append(msg)
        log.warning(msg)
        print(f"[llmkit deploy] {msg}", file=sys.stderr, flush=True)

    def replica_url(self, i: int) -> str:
        return f"http://{self.replica_host}:{self.ports[i]}"

    def wait_healthy(self, i: int, timeout_s: float, stop: threading.Event | None = None) -> bool:
        """Wait for replica `i`'s /health to answer 200; False if `stop` was set meanwhile."""
        child = self.replicas[i]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return False
            if not child.alive():
                raise RuntimeError(f"{child.name} exited with code {child.proc.returncode} before it was ready; "
                                   f"last lines of {child.log_path}:\n{_tail(child.log_path)}")
            if _http_status(self.replica_url(i) + "/health", timeout=1.0) == 200:
                return True
            time.sleep(0.2)
        raise TimeoutError(f"{child.name} did not answer 200 on /health within {timeout_s:.0f} s; "
                           f"last lines of {child.log_path}:\n{_tail(child.log_path)}")

    def supervise_once(self) -> None:
        """Restart every child that exited (with back-off); called every ``poll_s`` by `deploy`."""
        now = time.monotonic()
        for child in [*self.replicas, *([self.nginx] if self.nginx else [])]:
            if self.stopping or child.alive():
                continue
            if child.next_start == 0.0:  # just found dead: restart at once, or after a back-off if it died young
                quick = child.restarts > 0 and now - child.started_at < 60
                delay = child.backoff_s if quick else 0.0
                child.backoff_s = min(30.0, child.backoff_s * 2) if quick else 1.0
                child.next_start = now + delay
                self.note(f"{child.name} exited with code {child.proc.returncode}; restarting"
                          f"{f' in {delay:.0f} s' if delay else ''} (log: {child.log_path})")
            if now >= child.next_start:
                child.restarts += 1
                child.next_start = 0.0
                child.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGQUIT nginx (graceful), SIGTERM the replicas (they drain), then SIGKILL what is left."""
        self.stopping = True
        if self.nginx:
            self.nginx.signal(signal.SIGQUIT)
        for r in self.replicas:
            r.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        children = [c for c in [self.nginx, *self.replicas] if c is not None]
        for c in children:
            if c.proc is None:
                continue
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.note(f"{c.name} did not stop within {timeout_s:.0f} s: killing it")
                c.proc.kill()
                c.proc.wait()


def deploy(model_dir: str | Path | None, replicas: int = 2, host: str = "127.0.0.1", port: int = 8000,
           base_port: int | None = None, run_dir: str | Path = "runs/deploy", serve_args: Sequence[str] = (), *,
           nginx: str | None = None, serve_command: Sequence[str] | None = None, health_timeout_s: float = 300.0,
           stop_timeout_s: float = 30.0, poll_s: float = 0.5, threads_per_replica: int | None = None,
           stop_event: threading.Event | None = None, on_ready: Callable[[Deployment], None] | None = None,
           **nginx_options) -> int:
    """Run `replicas` servers of `model_dir` behind nginx on ``host:port`` until SIGINT/SIGTERM or `stop_event`.

    `serve_args` are passed to every ``llmkit serve`` (e.g. ``["--max-batch", "8", "--api-key", KEY]``);
    `serve_command` replaces ``[python, -m, llmkit, serve, --model, model_dir]`` (the replica's
    ``--host``/``--port`` are appended either way). `nginx_options` go to `nginx_config`.
    `on_ready(deployment)` is called once nginx answers; signal handlers are installed only when called
    from the main thread (otherwise stop it with `stop_event`). Returns 0 after a clean stop.
    """
    if replicas < 1:
        raise ValueError("deploy: replicas must be at least 1")
    nginx_bin = find_nginx(nginx)
    if nginx_bin is None:
        raise FileNotFoundError("deploy: nginx not found (install it, e.g. `apt-get install nginx-light`, "
                                "or pass --nginx PATH)")
    run = prepare_run_dir(run_dir)
    base = port + 1 if base_port is None else base_port
    ports = [base + i for i in range(replicas)]
    if port in ports:
        raise ValueError(f"deploy: the replica ports {ports} include nginx's port {port}")
    replica_host = "127.0.0.1"
    if serve_command is None:
        if model_dir is None:
            raise ValueError("deploy: model_dir is required")
        serve_command = [sys.executable, "-m", "llmkit", "serve", "--model", str(Path(model_dir).resolve())]
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        n = threads_per_replica or max(1, (os.cpu_count() or 1) // replicas)
        env["OMP_NUM_THREADS"] = str(n)
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    dep = Deployment(run_dir=run, url=f"http://{shown_host}:{port}", ports=ports, replica_host=replica_host)
    for i, p in enumerate(ports):
        argv = [*serve_command, "--host", replica_host, "--port", str(p), *serve_args]
        dep.replicas.append(_Child(f"replica {i} (port {p})", argv, run / f"replica-{i}.log", env=env))

    stop = stop_event or threading.Event()
    installed: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            installed[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        for r in dep.replicas:
            r.start()
        for i in range(replicas):  # a replica that dies during start-up is an error
            if not dep.wait_healthy(i, health_timeout_s, stop):
                return 130  # interrupted while waiting
        conf = nginx_config([(replica_host, p) for p in ports], port, listen_host=host, **nginx_options)
        dep.config_path = run / "nginx.conf"
        dep.config_path.write_text(conf)
        nginx_argv = [nginx_bin, "-p", str(run) + "/", "-c", "nginx.conf", "-e", "logs/error.log"]
        check = subprocess.run([*nginx_argv, "-t"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx rejected {dep.config_path}:\n{check.stderr}")
        dep.nginx = _Child("nginx", nginx_argv, run / "logs" / "nginx.out")
        dep.nginx.start()
        deadline = time.monotonic() + 15
        while _http_status(dep.url + "/nginx-health", timeout=1.0) != 200:
            if not dep.nginx.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start; {run / 'logs' / 'error.log'}:\n"
                                   f"{_tail(run / 'logs' / 'error.log')}\n{_tail(dep.nginx.log_path)}")
            time.sleep(0.1)
        print(f"llmkit deploy: {replicas} replica(s) on ports {ports[0]}-{ports[-1]} behind nginx at {dep.url} "
              f"(OpenAI base URL {dep.url}/v1; logs in {run})", flush=True)
        if on_ready is not None:
            on_ready(dep)
        while not stop.wait(poll_s):
            dep.supervise_once()
        return 0
    finally:
        dep.stop(stop_timeout_s)
        for sig, handler in installed.items():
            signal.signal(sig, handler)


@dataclass
class DeployConfig:
    """Settings of `llmkit deploy` (`run_deploy`); every flag is a shorthand for one of these keys."""

    model: str | None = None
    """Model directory served by every replica (not needed with print_config)."""
    replicas: int = 2
    """Number of `llmkit serve` processes."""
    host: str = "127.0.0.1"
    """Address nginx listens on (0.0.0.0: all interfaces)."""
    port: int = 8000
    """nginx's port."""
    base_port: int | None = None
    """Port of the first replica, the others follow consecutively (default: port + 1)."""
    run_dir: str = "runs/deploy"
    """nginx.conf, pid file, logs of nginx and the replicas."""
    nginx: str | None = None
    """nginx binary (default: nginx on PATH or /usr/sbin/nginx)."""
    max_body: str = "8m"
    """nginx client_max_body_size."""
    max_fails: int = 3
    """Failures that take a replica out."""
    fail_timeout: int = 10
    """Seconds in which max_fails count, and for which a failed replica is left out."""
    health_timeout: float = 300.0
    """Seconds to wait for each replica's /health at start-up."""
    print_config: Literal["nginx", "kubernetes"] | None = None
    """Print the nginx configuration (or the Kubernetes manifests) and exit; starts nothing."""
    serve_args: list[str] = field(default_factory=list)
    """Flags for every `llmkit serve` (e.g. [--max-batch, "8", --api-key, KEY])."""

    def validate(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas: must be at least 1, got {self.replicas}")
        if self.print_config is None and not self.model:
            raise ValueError("model: required (unless print_config)")


def run_deploy(cfg: DeployConfig | None = None, **settings) -> int:
    """`llmkit deploy`: print the nginx / Kubernetes configuration (``print_config``) or run `deploy`.

    Takes a `DeployConfig` or its fields as keyword arguments (``run_deploy(model="m", replicas=3)``);
    returns the exit code."""
    if cfg is None:
        cfg = DeployConfig(**settings)
    elif settings:
        cfg = dataclasses.replace(cfg, **settings)
    cfg.validate()
    base = cfg.port + 1 if cfg.base_port is None else cfg.base_port
    nginx_options = dict(client_max_body_size=cfg.max_body, max_fails=cfg.max_fails,
                         fail_timeout_s=cfg.fail_timeout)
    if cfg.print_config == "nginx":
        print(nginx_config([("127.0.0.1", base + i) for i in range(cfg.replicas)], cfg.port,
                           listen_host=cfg.host, **nginx_options), end="")
        return 0
    if cfg.print_config == "kubernetes":
        path = kubernetes_manifest_path()
        if path is None:
            print("llmkit deploy: deploy/kubernetes/llmkit.yaml ships with the source checkout, not the package",
                  file=sys.stderr)
            return 1
        print(path.read_text(), end="")
        return 0
    return deploy(cfg.model, replicas=cfg.replicas, host=cfg.host, port=cfg.port, base_port=cfg.base_port,
                  run_dir=cfg.run_dir, serve_args=list(cfg.serve_args), nginx=cfg.nginx,
                  health_timeout_s=cfg.health_timeout, **nginx_options)
