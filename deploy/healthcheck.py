"""The image's HEALTHCHECK: exit 0 when this container's relay or worker answers /healthz.

The relay serves it on ``CDC_METRICS_PORT`` (9190), a worker on ``CDC_WORKER_METRICS_PORT``
(9191); whichever the container runs answers, the other port is closed.
"""

import os
import sys
import urllib.request


def main() -> int:
    ports = (
        os.environ.get("CDC_METRICS_PORT", "9190"),
        os.environ.get("CDC_WORKER_METRICS_PORT", "9191"),
    )
    for port in ports:
        if port in ("", "0"):
            continue
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as resp:
                if resp.status == 200:
                    return 0
        except OSError:
            continue
    print(f"no /healthz answered on ports {', '.join(ports)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
