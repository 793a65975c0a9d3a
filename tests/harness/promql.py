"""The series selectors of a PromQL expression: metric names and their label matchers.

Enough PromQL for the rules and dashboard in ``deploy/``: strings, ranges and subqueries
(``[5m:30s]``), grouping clauses (``by``/``without``/``on``/``ignoring``/``group_left``/
``group_right`` with their label lists), functions and aggregators, label matchers. An
unknown function or a selector without a metric name is an error, so a typo cannot hide as
"not a metric".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

FUNCTIONS = frozenset(
    {
        # aggregators
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        # functions
        "abs",
        "absent",
        "absent_over_time",
        "ceil",
        "changes",
        "clamp",
        "clamp_max",
        "clamp_min",
        "delta",
        "deriv",
        "exp",
        "floor",
        "histogram_quantile",
        "idelta",
        "increase",
        "irate",
        "label_join",
        "label_replace",
        "ln",
        "log2",
        "log10",
        "predict_linear",
        "rate",
        "resets",
        "round",
        "scalar",
        "sort",
        "sort_desc",
        "sqrt",
        "time",
        "timestamp",
        "vector",
        "avg_over_time",
        "min_over_time",
        "max_over_time",
        "sum_over_time",
        "count_over_time",
        "quantile_over_time",
        "last_over_time",
        "label_values",  # Grafana's templating query, same shape
    }
)
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset"})

_TOKEN = re.compile(
    r"""
    (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
   |(?P<range>\[[^\]]*\])
   |(?P<num>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
   |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
   |(?P<open>\()|(?P<close>\))|(?P<lbrace>\{)|(?P<rbrace>\})
   |(?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>,])
   |(?P<space>\s+)
    """,
    re.VERBOSE,
)


class PromQLError(ValueError):
    """The expression uses something this reader does not know."""


@dataclass(frozen=True)
class Selector:
    """``name{label op "value", ...}``."""

    name: str
    matchers: tuple[tuple[str, str, str], ...] = field(default=())


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise PromQLError(f"cannot read {expr[pos : pos + 20]!r} in {expr!r}")
        kind = m.lastgroup or ""
        if kind != "space":
            out.append((kind, m.group()))
        pos = m.end()
    return out


def _skip_parens(tokens: list[tuple[str, str]], i: int) -> int:
    """Index after the ``)`` matching the ``(`` at ``i``."""
    depth = 0
    for j in range(i, len(tokens)):
        depth += {"open": 1, "close": -1}.get(tokens[j][0], 0)
        if depth == 0:
            return j + 1
    raise PromQLError("unbalanced parentheses")


Matchers = tuple[tuple[str, str, str], ...]


def _matchers(tokens: list[tuple[str, str]], i: int) -> tuple[Matchers, int]:
    """Matchers of the ``{`` at ``i`` and the index after its ``}``."""
    found, j = [], i + 1
    while tokens[j][0] != "rbrace":
        (k1, label), (k2, op), (k3, value) = tokens[j : j + 3]
        if (k1, k2, k3) != ("ident", "op", "str") or op not in ("=", "!=", "=~", "!~"):
            raise PromQLError(f"bad label matcher near {label!r}")
        found.append((label, op, value[1:-1].encode().decode("unicode_escape")))
        j += 3
        if tokens[j][0] == "op" and tokens[j][1] == ",":
            j += 1
    return tuple(found), j + 1


def selectors(expr: str) -> list[Selector]:
    """Every series selector in ``expr``, in order."""
    tokens = _tokens(expr)
    found: list[Selector] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        follows = tokens[i + 1][0] if i + 1 < len(tokens) else ""
        if kind == "lbrace":
            raise PromQLError(f"selector without a metric name in {expr!r}")
        if kind != "ident":
            i += 1
        elif text in GROUPING and follows == "open":
            i = _skip_parens(tokens, i + 1)
        elif text in FUNCTIONS or text in KEYWORDS:
            i += 1
        elif follows == "open":
            raise PromQLError(f"unknown function {text!r} in {expr!r}")
        elif follows == "lbrace":
            matchers, i = _matchers(tokens, i + 1)
            found.append(Selector(text, matchers))
        else:
            found.append(Selector(text))
            i += 1
    return found


def label_values_query(query: str) -> tuple[str, str] | None:
    """``label_values(metric, label)`` -> ``(metric, label)``; None for other queries."""
    m = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*(\w+)\s*\)\s*", query)
    return (m.group(1), m.group(2)) if m else None
