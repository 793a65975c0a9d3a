"""Live monitoring: a Prometheus process scraping the relay.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from harness.common import free_port, wait_for
from harness.processes import Daemon
from harness.rabbitmq import http_ok


class Prometheus:
    """A Prometheus server on a free port with its config and data in ``workdir``."""

    def __init__(self, binary: str, workdir: Path, config: dict[str, Any]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.daemon = Daemon(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=2h",
                "--log.level=warn",
            ],
            workdir / "prometheus.log",
        )

    def start(self) -> Prometheus:
        self.daemon.start()
        wait_for(lambda: http_ok(f"{self.url}/-/ready"), 60, self.daemon.tail, interval=0.5)
        return self

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as resp:
            doc = json.loads(resp.read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now (an error fails the test)."""
        data = self.api("query", query=expr)
        return list(data["result"]) if data["resultType"] == "vector" else [data]

    def firing(self) -> list[dict[str, str]]:
        """Labels of every alert that is firing now."""
        return [a["labels"] for a in self.api("alerts")["alerts"] if a["state"] == "firing"]

    def stop(self) -> None:
        self.daemon.stop()
