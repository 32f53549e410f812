"""A real Prometheus server for tests, so "Prometheus can scrape it" is checked, not assumed.

`PrometheusServer` runs the system Prometheus (Debian package `prometheus`) on a free loopback
port, with a throwaway config that scrapes one target every second and a throwaway TSDB, and
answers PromQL through the HTTP API with urllib only. `prometheus_binary()` returns None where
it is not installed, so a test can skip with a reason instead of failing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: {job}
    static_configs:
      - targets: ["{target}"]
"""


def prometheus_binary() -> str | None:
    """The Prometheus executable ($PROMETHEUS_BINARY, PATH, /usr/bin), or None to skip on."""
    candidates = [os.environ.get("PROMETHEUS_BINARY"), shutil.which("prometheus")]
    candidates.append("/usr/bin/prometheus")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def free_port() -> int:
    """A loopback port nothing listens on now (another process could still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrometheusServer:
    """A Prometheus process scraping `target` ("127.0.0.1:PORT") every second; a context manager."""

    def __init__(
        self, target: str, *, job: str = "cnnserve", binary: str | None = None, ready_s: float = 20
    ) -> None:
        self.target = target
        self.job = job
        self.binary = binary or prometheus_binary()
        self.ready_s = ready_s
        self.port = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        """Starts Prometheus and returns once it reports ready, or raises with its log."""
        if self.binary is None:
            raise RuntimeError("Prometheus is not installed (apt-get install prometheus)")
        self._dir = tempfile.TemporaryDirectory(prefix="prometheus-")
        root = Path(self._dir.name)
        (root / "prometheus.yml").write_text(CONFIG.format(job=self.job, target=self.target))
        self.port = free_port()
        command = [
            self.binary,
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with open(root / "prometheus.log", "wb") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Polls /-/ready: Prometheus answers 503 while it replays its (empty) TSDB."""
        deadline = time.monotonic() + self.ready_s
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"Prometheus exited with {self._process.returncode}: {self.log()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"Prometheus not ready after {self.ready_s} s: {self.log()}")

    def log(self) -> str:
        """The tail of Prometheus's own log, for failure messages."""
        if self._dir is None:
            return ""
        path = Path(self._dir.name) / "prometheus.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        """GETs /api/v1/<path> and returns its `data`, raising on an API error."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=5) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus API {path} failed: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query: one {"metric": labels, "value": [time, "value"]} per series."""
        data = self.api("query", query=promql)
        if data["resultType"] != "vector":
            raise RuntimeError(f"expected an instant vector, got {data['resultType']}")
        return list(data["result"])

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout: float = 15,
    ) -> list[dict[str, Any]]:
        """Polls `promql` until `predicate` holds on its result; scrapes land once a second."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{promql!r} still {result} after {timeout} s; targets: {self.targets()}"
                )
            time.sleep(0.2)

    def targets(self) -> list[dict[str, Any]]:
        """Each target's health and last scrape error: the first thing to read on a failure."""
        active = self.api("targets")["activeTargets"]
        keys = ("scrapeUrl", "health", "lastError")
        return [{key: target.get(key) for key in keys} for target in active]

    def metadata(self, metric: str) -> list[dict[str, Any]]:
        """The TYPE/HELP Prometheus recorded for `metric` from the scraped exposition."""
        return list(self.api("metadata", metric=metric).get(metric, []))

    def stop(self) -> None:
        """Terminates Prometheus (killing it if it lingers) and deletes its files."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
