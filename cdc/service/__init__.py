"""Plumbing the relay and the workers share: settings, CLI helpers, the reconnect loop,
logs, backoff, refusals and the /metrics + /healthz endpoint. It imports nothing of the
relay but the package version, the error types and the URL checks (``cdc.service.urls``)."""
