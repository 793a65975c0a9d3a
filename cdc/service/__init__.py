"""Plumbing the relay and the workers share: settings, CLI helpers, the reconnect loop,
logs, backoff, refusals and the /metrics + /healthz endpoint. Imports nothing of the relay
but its error types.
"""
