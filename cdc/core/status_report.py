"""What `cdc status` shows: the slot, the three lags, the relay's state and the parked counts.

Pure: it takes what :mod:`cdc.shell.status_probe` read (the slot from PostgreSQL, the relay's and
the workers' ``/metrics`` and ``/healthz``, the parking queue's depth from the broker) and
builds the JSON document and the one-screen text. A value nobody could read is ``None``
("unknown" on screen), never 0: a relay that does not answer is not a relay with no lag.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Labels = dict[str, str]


@dataclass(frozen=True, slots=True)
class Scrape:
    """One process's endpoint as read: its ``/metrics`` text and ``/healthz`` JSON, or why not."""

    url: str
    metrics: str | None = None
    health: dict[str, Any] | None = None
    error: str | None = None

    @property
    def reachable(self) -> bool:
        """Whether ``/metrics`` answered."""
        return self.metrics is not None


@dataclass(frozen=True, slots=True)
class Depths:
    """Messages waiting per queue, as the broker reports them.

    ``asked`` is False without ``CDC_AMQP_URL``; a queue the broker does not have, or every
    queue when it could not be asked (``error``), is None.
    """

    counts: Mapping[str, int | None] = field(default_factory=dict)
    asked: bool = False
    error: str | None = None


@dataclass(slots=True)
class Samples:
    """The samples of one ``/metrics`` text, by metric name."""

    by_name: dict[str, list[tuple[Labels, float]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Samples:
        """Parse Prometheus text exposition; a body that is not one gives no samples."""
        found = cls()
        try:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    found.by_name.setdefault(sample.name, []).append(
                        (dict(sample.labels), float(sample.value))
                    )
        except ValueError:
            return cls()
        return found

    def value(self, name: str, **labels: str) -> float | None:
        """The first sample of ``name`` with these labels; None if absent or NaN (unknown)."""
        for have, value in self.by_name.get(name, []):
            if all(have.get(k) == v for k, v in labels.items()):
                return None if math.isnan(value) else value
        return None

    def each(self, name: str) -> list[tuple[Labels, float | None]]:
        """Every sample of ``name``, NaN as None."""
        return [(k, None if math.isnan(v) else v) for k, v in self.by_name.get(name, [])]

    def state(self, name: str) -> str | None:
        """The label ``state`` of the ``name{state=...}`` series that is 1."""
        for labels, value in self.by_name.get(name, []):
            if value == 1 and "state" in labels:
                return labels["state"]
        return None


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def relay_view(scrape: Scrape | None, note: str | None = None) -> dict[str, Any]:
    """The relay's part: its state (``/healthz``, else its state gauge), lags and parked totals."""
    if scrape is None:
        return {"metrics_url": None, "reachable": False, "error": note, "state": None,
                "reason": None, "in_flight": None, "flushed_lsn": None,
                "lag_bytes": None, "lag_seconds": None, "parked_total": None}
    s = Samples.parse(scrape.metrics or "")
    health = scrape.health or {}
    parked = None
    if scrape.reachable:
        parked = {kind: _int(s.value("cdc_events_parked_total", kind=kind))
                  for kind in ("unroutable", "malformed")}
    return {
        "metrics_url": scrape.url,
        "reachable": scrape.reachable,
        "error": scrape.error,
        "state": health.get("state") or s.state("cdc_relay_state"),
        "reason": health.get("reason"),
        "in_flight": health.get("in_flight", _int(s.value("cdc_inflight_events"))),
        "flushed_lsn": health.get("flushed_lsn"),
        "lag_bytes": _int(s.value("cdc_replication_lag_bytes")),
        "lag_seconds": s.value("cdc_replication_lag_seconds"),
        "parked_total": parked,
    }


def worker_view(scrape: Scrape) -> dict[str, Any]:
    """One worker's part: name, state, event age and parked messages per queue."""
    s = Samples.parse(scrape.metrics or "")
    names = sorted({labels.get("worker", "") for labels, _ in s.each("cdc_worker_state")} - {""})
    health = scrape.health or {}
    return {
        "metrics_url": scrape.url,
        "reachable": scrape.reachable,
        "error": scrape.error,
        "worker": health.get("worker") or (names[0] if names else None),
        "state": health.get("state") or s.state("cdc_worker_state"),
        "queues": sorted(
            {labels["queue"] for labels, _ in s.each("cdc_worker_processed_total")
             if "queue" in labels}
        ),
        "event_age_seconds": {
            labels["queue"]: value
            for labels, value in s.each("cdc_worker_event_age_seconds") if "queue" in labels
        },
        "parked_messages": {
            labels["queue"]: _int(value)
            for labels, value in s.each("cdc_worker_parked_messages") if "queue" in labels
        },
    }


def consumer_lag(workers: Sequence[dict[str, Any]]) -> float | None:
    """The largest event age over every worker's queues: None unless every worker answered
    and at least one has acked an event (a worker that does not answer could be the one
    that lags)."""
    if not workers or not all(w["reachable"] for w in workers):
        return None
    ages = [a for w in workers for a in w["event_age_seconds"].values() if a is not None]
    return max(ages) if ages else None


def backlog(workers: Sequence[dict[str, Any]], depths: Depths) -> int | None:
    """Messages waiting in every listed worker's queues; None unless all of them are known."""
    queues = [q for w in workers for q in w["queues"]]
    if not queues or not all(w["reachable"] for w in workers):
        return None
    counts = [depths.counts.get(q) for q in queues]
    return None if None in counts else sum(c for c in counts if c is not None)


def build(
    slot: dict[str, Any],
    relay: Scrape | None,
    workers: Sequence[Scrape],
    parking_queue: str,
    depths: Depths,
    relay_note: str | None = None,
) -> dict[str, Any]:
    """The `cdc status --json` document: the slot's keys as they were, plus ``relay``,
    ``workers``, ``lags`` and ``parked``."""
    r = relay_view(relay, relay_note)
    ws = [worker_view(w) for w in workers]
    parked = depths.counts.get(parking_queue)
    return slot | {
        "relay": r,
        "workers": ws,
        "lags": {
            "slot_bytes": slot.get("lag_bytes"),
            "broker_confirmed_bytes": r["lag_bytes"],
            "broker_confirmed_seconds": r["lag_seconds"],
            "consumer_seconds": consumer_lag(ws),
            "consumer_messages": backlog(ws, depths),
        },
        "parked": {
            "queue": parking_queue,
            "messages": parked,
            "source": "broker" if parked is not None else None,
            "error": _depth_error(depths, parking_queue),
            "relay_total": r["parked_total"],
            "workers": {q: n for w in ws for q, n in w["parked_messages"].items()},
        },
    }


def _depth_error(depths: Depths, queue: str) -> str | None:
    if not depths.asked:
        return "CDC_AMQP_URL not set"
    if depths.error:
        return depths.error
    if depths.counts.get(queue) is None:
        return "no such queue (the relay declares it at start)"
    return None


# -- the screen ------------------------------------------------------------------------------

UNKNOWN = "unknown"


def size(n: float | None) -> str:
    """Bytes for people: ``512 B``, ``1.5 KiB``, ``3.2 MiB``; None is unknown."""
    if n is None:
        return UNKNOWN
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop returns at GiB


def seconds(s: float | None) -> str:
    """``0.35 s``, ``2m05s``, ``3h10m``; None is unknown."""
    if s is None:
        return UNKNOWN
    if s < 60:
        return f"{s:.2f} s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _safe(n: int | None) -> str:
    # PostgreSQL gives no safe_wal_size when max_slot_wal_keep_size is -1: nothing caps it.
    return "unlimited" if n is None else size(n)


def _slot_lines(doc: dict[str, Any]) -> list[str]:
    if not doc.get("exists"):
        return [f"slot      {doc['slot_name']}: does not exist"]
    active = f"active, pid {doc['active_pid']}" if doc["active"] else "not active"
    lines = [
        f"slot      {doc['slot_name']} ({doc['plugin']}) {active}",
        f"          confirmed_flush_lsn {doc['confirmed_flush_lsn']}  restart_lsn "
        f"{doc['restart_lsn']}  current_wal_lsn {doc['current_wal_lsn']}",
        f"          wal_status {doc['wal_status']}  retained {size(doc['retained_bytes'])}"
        f"  safe_wal_size {_safe(doc['safe_wal_size'])}",
    ]
    if doc.get("invalidation_reason"):
        lines[-1] += f"  invalidation_reason {doc['invalidation_reason']}"
    return lines


def _health_line(doc: dict[str, Any]) -> str:
    hint = ": run `cdc recover`" if doc["health"] == "lost" else ""
    reason = f" ({doc['health_reason']})" if doc.get("health_reason") else ""
    return f"health: {doc['health']}{reason}{hint}"


def _relay_line(r: dict[str, Any]) -> str:
    if not r["reachable"]:
        where = f" at {r['metrics_url']}" if r["metrics_url"] else ""
        why = f": {r['error']}" if r["error"] else ""
        return f"relay     {UNKNOWN} (no answer{where}{why})"
    state = r["state"] or UNKNOWN
    if r["reason"]:
        state += f" ({r['reason']})"
    flushed = f", flushed {r['flushed_lsn']}" if r["flushed_lsn"] else ""
    in_flight = "" if r["in_flight"] is None else f", {r['in_flight']} in flight"
    return f"relay     {state}{in_flight}{flushed}  [{r['metrics_url']}]"


def _lag_lines(doc: dict[str, Any]) -> list[str]:
    lags = doc["lags"]
    workers = doc["workers"]
    if not workers:
        consumer = f"{UNKNOWN} (give --worker-metrics URL)"
    else:
        waiting = lags["consumer_messages"]
        consumer = (
            f"{seconds(lags['consumer_seconds'])} (commit to ack, oldest queue), "
            f"{UNKNOWN if waiting is None else waiting} messages waiting"
        )
    return [
        f"lag       slot             {size(lags['slot_bytes'])} (WAL PostgreSQL keeps)",
        f"          broker-confirmed {size(lags['broker_confirmed_bytes'])}, "
        f"{seconds(lags['broker_confirmed_seconds'])}",
        f"          consumers        {consumer}",
    ]


def _parked_lines(doc: dict[str, Any]) -> list[str]:
    p = doc["parked"]
    if p["messages"] is not None:
        queue = f"{p['messages']} waiting (broker)"
    else:
        queue = f"{UNKNOWN} ({p['error']})"
    line = f"parked    {p['queue']}: {queue}"
    total = p["relay_total"]
    if total is not None:
        line += (f"; relay parked since start: unroutable {total['unroutable']}, "
                 f"malformed {total['malformed']}")
    lines = [line]
    for queue, n in sorted(p["workers"].items()):
        lines.append(f"          {queue}: {UNKNOWN if n is None else n} waiting (worker)")
    return lines


def _worker_lines(workers: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for w in workers:
        if not w["reachable"]:
            lines.append(f"worker    {UNKNOWN} (no answer at {w['metrics_url']}: {w['error']})")
            continue
        ages = w["event_age_seconds"]
        oldest = max((a for a in ages.values() if a is not None), default=None)
        lines.append(
            f"worker    {w['worker'] or UNKNOWN}: {w['state'] or UNKNOWN}, event age "
            f"{seconds(oldest)} over {len(ages)} queue(s)  [{w['metrics_url']}]"
        )
    return lines


def _checkpoint_lines(cp: dict[str, Any] | None) -> list[str]:
    if cp is None:
        return []
    lost = f" ({cp['lost_reason']})" if cp["lost_reason"] else ""
    return [
        f"checkpoint {cp['state']}{lost}  proven_at {cp['proven_at']}  "
        f"confirmed_lsn {cp['confirmed_lsn']}",
        f"          backfill {cp['backfill_mode']}: {cp['backfill_rows_done']}/"
        f"{cp['backfill_rows_total']} rows, done={cp['backfill_done']}",
    ]


def _failover_lines(failover: dict[str, Any] | None) -> list[str]:
    if failover is None:
        return []
    listed = ",".join(failover["synchronized_standby_slots"]) or "(none)"
    lines = [
        f"failover slot: {failover['slot_failover']} (supported: {failover['supported']}; "
        f"synchronized_standby_slots: {listed})"
    ]
    ready = {True: "ready", False: "NOT ready", None: "unknown (use --standby-url)"}
    for standby in failover["standbys"]:
        lines.append(
            f"  standby {standby['standby']} ({standby['state'] or 'not connected'}): "
            f"{ready[standby['ready']]}"
        )
        lines += [f"    - {reason}" for reason in standby["reasons"]]
    return lines


def render(doc: dict[str, Any], heading: str) -> list[str]:
    """The one-screen text of a :func:`build` document."""
    return [
        heading,
        *_slot_lines(doc),
        _health_line(doc),
        _relay_line(doc["relay"]),
        *_worker_lines(doc["workers"]),
        *_lag_lines(doc),
        *_parked_lines(doc),
        *_checkpoint_lines(doc.get("checkpoint")),
        *_failover_lines(doc.get("failover")),
    ]
