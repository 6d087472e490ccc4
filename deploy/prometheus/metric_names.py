#!/usr/bin/env python3
"""The sluice metrics that the Grafana dashboard and the alert rules query.

    metric_names.py                    every distinct sluice_* metric name queried, one a line
    metric_names.py --check            checks the dashboard's panels and that every metric queried
                                       is one in metrics.txt (or `up`); exits 1 naming each problem
    metric_names.py --dashboard-rules  the dashboard's queries as a Prometheus rules file (Grafana's
                                       variables filled in), for `promtool check rules` to parse

Standard library only: it runs under whatever python3 a test has, so the rules file is read
with a small reader of `expr:` keys rather than a YAML library.
"""

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE.parent / "grafana" / "sluice.json"
RULES = HERE / "alerts.yml"
EXPORTED = HERE / "metrics.txt"

SLUICE_NAME = re.compile(r"sluice_[a-z0-9_]+")
# PromQL words that are not metric names: keywords, binary operators, modifiers.
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
            "bool", "offset", "atan2", "inf", "nan"}
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENTIFIER = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(?!\w)(\s*\()?")
LABEL_VALUES = re.compile(r"label_values\(\s*([^,)]*)")
PROMETHEUS_DATASOURCE = {"${datasource}", "$datasource"}


def metric_identifiers(expr):
    """Metric names an expression selects: identifiers outside strings, label matchers, ranges
    and grouping lists that are neither functions nor keywords."""
    selector = LABEL_VALUES.match(expr.strip())
    if selector:  # a Grafana variable query: only its first argument is PromQL
        expr = selector.group(1)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = GROUPING.sub(" ", expr)
    return [m.group(1) for m in IDENTIFIER.finditer(expr) if not m.group(2) and m.group(1) not in KEYWORDS]


def rule_exprs(path=RULES):
    """(where, expr) for every `expr:` in a rules file: plain scalars and block scalars (`|`, `>`)."""
    lines = Path(path).read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        key = re.match(r"^(\s*(?:-\s+)?)expr:\s*(.*?)\s*$", line)
        if not key:
            continue
        value = key.group(2)
        if value[:1] in "|>":
            indent = len(key.group(1))
            block = []
            for following in lines[i + 1:]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            value = " ".join(part for part in block if part)
        elif value[:1] in "\"'":
            value = value[1:-1]
        found.append((f"{Path(path).name}:{i + 1}", value))
    return found


def panels_of(dashboard):
    """Every panel, those inside collapsed rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(dashboard):
    """(where, expr) for every panel target and every query variable."""
    found = []
    for panel in panels_of(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((f"panel {panel.get('title')!r} target {target.get('refId')}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            query = query.get("query") if isinstance(query, dict) else query
            found.append((f"variable {variable.get('name')!r}", query or ""))
    return found


def exported():
    """The series names the workers export, from metrics.txt (a histogram as its three series)."""
    names = set()
    for line in EXPORTED.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, kind = line.split()
        names.update([f"{name}_bucket", f"{name}_sum", f"{name}_count"] if kind == "histogram" else [name])
    return names


def check(dashboard):
    problems = []
    ids = [panel.get("id") for panel in panels_of(dashboard)]
    problems += [f"panel id {i} is used twice" for i in sorted({i for i in ids if ids.count(i) > 1})]
    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource":
        problems.append("no `datasource` variable of type datasource")
    for panel in panels_of(dashboard):
        if panel.get("type") == "row":
            continue
        title = f"panel {panel.get('title')!r}"
        if (panel.get("datasource") or {}).get("uid") not in PROMETHEUS_DATASOURCE:
            problems.append(f"{title}: its datasource is not the ${{datasource}} variable")
        targets = panel.get("targets") or []
        if not any(t.get("expr", "").strip() for t in targets):
            problems.append(f"{title}: no target with an expr")
        for target in targets:
            uid = (target.get("datasource") or {}).get("uid", "${datasource}")
            if uid not in PROMETHEUS_DATASOURCE:
                problems.append(f"{title} target {target.get('refId')}: datasource {uid!r}")
            if not target.get("expr", "").strip():
                problems.append(f"{title} target {target.get('refId')}: empty expr")
    known = exported() | {"up"}
    for where, expr in dashboard_exprs(dashboard) + rule_exprs():
        for name in metric_identifiers(expr):
            if name not in known:
                problems.append(f"{where}: {name} is not a metric the workers export (metrics.txt)")
    return problems


def as_rules(dashboard):
    """The panels' queries as recording rules, Grafana's variables filled in."""
    rules = []
    for panel in panels_of(dashboard):
        for target in panel.get("targets", []):
            expr = re.sub(r"\$\{?__(?:rate_interval|interval|range)\b\}?", "5m", target.get("expr", ""))
            expr = re.sub(r"\$\{[A-Za-z_]\w*\}|\$[A-Za-z_]\w*", ".*", expr)
            rules.append({"record": f"panel_{panel.get('id')}:{target.get('refId')}", "expr": expr})
    return {"groups": [{"name": "sluice-dashboard", "rules": rules}]}


def main(argv):
    dashboard = json.loads(DASHBOARD.read_text())
    if argv == ["--check"]:
        problems = check(dashboard)
        for problem in problems:
            print(f"{DASHBOARD.name} / {RULES.name}: {problem}", file=sys.stderr)
        return 1 if problems else 0
    if argv == ["--dashboard-rules"]:
        print(json.dumps(as_rules(dashboard), indent=1))
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    exprs = dashboard_exprs(dashboard) + rule_exprs()
    names = {name for _, expr in exprs for name in metric_identifiers(expr) if SLUICE_NAME.fullmatch(name)}
    print("\n".join(sorted(names)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
