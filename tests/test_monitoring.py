"""The shipped monitoring files (packaging/monitoring/): alert rules checked and unit-tested by promtool,
the Grafana dashboard's structure, and every metric they use is one kktd exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kktd.delivery import RegisterReport, Shift, ShiftState
from kktd.metrics import Metrics, ReceiptOutcome, RequestOutcome, StateSnapshot
from kktd.states import FN_EXPIRY_WARN_S, REGISTER_BACKLOG_CRITICAL_S, REGISTER_BACKLOG_WARN_S, BreakerState
from tests.support import REPO, require

MONITORING = REPO / "packaging" / "monitoring"
ALERTS = MONITORING / "kktd-alerts.yml"
ALERT_TESTS = MONITORING / "kktd-alerts.test.yml"
DASHBOARD = MONITORING / "kktd-dashboard.json"
ROWS = ["Intake", "Buffer", "Upstream", "Register", "Process"]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# What Grafana puts in place of its variables when the dashboard shows every terminal.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*"}


def promtool() -> str:
    path = shutil.which("promtool")
    require(path is not None, "promtool is missing (Debian's prometheus package; `make test` installs it)")
    assert path is not None
    return path


def run_promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def graph_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def dashboard_expressions() -> list[str]:
    return [t["expr"] for p in graph_panels(dashboard()) for t in p["targets"]]


def alert_expressions() -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^\s+expr:\s*(.+)$", ALERTS.read_text(), re.M)]


# The alerts an operator relies on; the rules file may add more, never drop one of these.
CORE_ALERTS = frozenset(
    {
        "KktdDown",
        "KktdPendingOldWarning",
        "KktdPendingOldCritical",
        "KktdUpstreamBreakerOpen",
        "KktdDeadLetters",
        "KktdDiskAlmostFull",
        "KktdBufferAlmostFull",
    }
)


def alert_names() -> list[str]:
    return re.findall(r"^\s+- alert:\s*(\S+)\s*$", ALERTS.read_text(), re.M)


def substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


# ---- alert rules ----


def test_alert_rules_pass_promtool_check() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


def test_alert_rules_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", ALERT_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The promtool tests are not vacuous: a rule that fires too early fails them."""
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    broken = ALERTS.read_text().replace("for: 30m", "for: 20m")
    assert broken != ALERTS.read_text()
    (tmp_path / ALERTS.name).write_text(broken)
    result = run_promtool("test", "rules", ALERT_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "KktdUpstreamBreakerOpen" in result.stdout + result.stderr


def test_every_alert_is_fired_by_a_unit_test() -> None:
    fired: set[str] = set()
    for block in ALERT_TESTS.read_text().split("- eval_time:")[1:]:
        name = re.search(r"alertname:\s*(\S+)", block)
        if name and "exp_labels" in block:
            fired.add(name.group(1))
    assert CORE_ALERTS <= set(alert_names())
    assert set(alert_names()) <= fired


def runbook_section() -> str:
    """docs/operations.md from its runbook heading to the next heading of the same level."""
    text = (REPO / "docs" / "operations.md").read_text()
    start = re.search(r"^(#+) Runbook\b.*$", text, re.MULTILINE)
    assert start, "docs/operations.md has no runbook section"
    end = re.compile(rf"^#{{1,{len(start.group(1))}}} ", re.MULTILINE).search(text, start.end())
    first, stop = start.end(), (end.start() if end else len(text))
    return text[first:stop]


def test_every_alert_has_a_severity_and_a_runbook() -> None:
    rules = ALERTS.read_text().split("- alert:")[1:]
    assert len(rules) == len(alert_names())
    for rule in rules:
        name = rule.split()[0]
        assert re.search(r"severity:\s*(warning|critical)\b", rule), name
        runbook = re.search(r'runbook:\s*"docs/operations\.md, Runbook: (\w+)"', rule)
        assert runbook, name
        # The runbook it names really is a heading of the runbook section in docs/operations.md.
        assert re.search(rf"^#+ {runbook.group(1)}$", runbook_section(), re.MULTILINE), name
        assert "summary:" in rule and "description:" in rule, name


# ---- dashboard ----


def test_dashboard_has_one_row_per_concern_in_order() -> None:
    board = dashboard()
    rows = [p for p in board["panels"] if p["type"] == "row"]
    assert [r["title"] for r in rows] == ROWS
    # Each row is followed by its panels, and every panel belongs to a row.
    assert board["panels"][0]["type"] == "row"
    counts: dict[str, int] = {}
    current = ""
    for panel in board["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
            assert panel["collapsed"] is False and panel["panels"] == []
        else:
            counts[current] = counts.get(current, 0) + 1
    assert all(counts.get(row, 0) >= 3 for row in ROWS), counts


def test_dashboard_importable_structure() -> None:
    board = dashboard()
    for key in ("title", "uid", "schemaVersion", "panels", "templating", "time"):
        assert key in board, key
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0 and grid["y"] >= 0, panel["title"]
    # Panels never overlap on Grafana's grid.
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps at {(x, y)}"
                cells.add((x, y))
    for panel in graph_panels(board):
        assert panel["type"] in ("timeseries", "stat", "state-timeline", "gauge", "table"), panel["type"]
        assert panel["title"] and panel["description"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]
        assert "unit" in panel["fieldConfig"]["defaults"]


def test_dashboard_has_a_datasource_variable_and_no_hard_coded_uid() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DATASOURCE
    assert variables["instance"]["includeAll"] and variables["instance"]["allValue"] == ".*"
    assert "__inputs" not in board  # an export "for sharing externally" would pin a datasource at import

    def uids(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasource":
                    assert isinstance(value, dict), f"datasource given by name: {value!r}"
                    yield value.get("uid", "")
                yield from uids(value)
        elif isinstance(node, list):
            for item in node:
                yield from uids(item)

    found = set(uids(board))
    assert found == {"${datasource}"}, found


def test_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each expression (as a recording rule), with the variables Grafana substitutes."""
    expressions = dashboard_expressions()
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for index, expr in enumerate(expressions):
        rules += [f"      - record: kktd_dashboard_check_{index}", f"        expr: {json.dumps(substitute(expr))}"]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text("\n".join(rules) + "\n")
    result = run_promtool("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(expressions)} rules found" in result.stdout


# ---- the contract between kktd/metrics.py and the shipped files ----


def exported_sample_names(tmp_path: Path) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    metrics = Metrics(now_ms=lambda: 1_800_000_000_000)
    metrics.prepare_upstream("kktd-ofd")
    metrics.intake_accepted(0.001)
    metrics.intake_replayed(0.001)
    metrics.intake_rejected("invalid_json")
    metrics.group_committed(4)
    metrics.upstream_request("kktd-ofd", RequestOutcome.OK, 0.05)
    metrics.upstream_receipts("kktd-ofd", ReceiptOutcome.FISCALIZED, 4)
    metrics.upstream_retry("kktd-ofd")
    metrics.event_loop_lag(0.001)
    metrics.bind_state(
        lambda: StateSnapshot(
            {"pending": 1},
            100,
            1_799_999_999_000,
            tmp_path / "buffer.db",
            "kktd-ofd",
            BreakerState.CLOSED,
            1_799_999_999_000,
            60.0,
            120.0,
            "test",
            # A register upstream's report: the kktd_register_* gauges are exported only with one.
            register=RegisterReport(
                shift=Shift(ShiftState.OPEN, 12),
                unsent_documents=3,
                oldest_unsent_ms=1_799_999_000_000,
                fn_valid_until_ms=1_830_000_000_000,
                paper_present=True,
                cover_open=False,
            ),
        )
    )
    families = text_string_to_metric_families(metrics.exposition().decode())
    return {sample.name for family in families for sample in family.samples}


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_metric_used_is_exported_by_kktd(tmp_path: Path, source: str) -> None:
    if source == "dashboard":
        variables = [v["definition"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]
        expressions = dashboard_expressions() + variables
    else:
        expressions = alert_expressions()
    assert expressions
    used = {
        name
        for expr in expressions
        for name in re.findall(r"\b((?:kktd|process|python)_[a-z_]+|up)\b(?=\s*[{\[),]|\s*$|\s)", expr)
    }
    used = {name for name in used if not name.endswith("_check")}
    assert used, expressions
    exported = exported_sample_names(tmp_path) | {"up"}  # `up` is Prometheus's own
    missing = sorted(used - exported)
    assert not missing, f"{source} uses metrics kktd does not export: {missing}"


# ---- a register upstream's alerts and panels ----


def alert_rules() -> list[tuple[str, str, str]]:
    """(name, severity, expr) of each rule, in the file's order."""
    rules = []
    for rule in ALERTS.read_text().split("- alert:")[1:]:
        expr = re.search(r"^\s+expr:\s*(.+)$", rule, re.M)
        severity = re.search(r"severity:\s*(\w+)", rule)
        assert expr and severity, rule
        rules.append((rule.split()[0], severity.group(1), expr.group(1).strip()))
    return rules


def days(text: str) -> int:
    """The threshold `N * 86400` of an expression, in seconds."""
    found = re.findall(r"\b(\d+) \* 86400\b", text)
    assert len(found) == 1, text
    return int(found[0]) * 86400


def test_the_register_alerts_fire_where_health_does() -> None:
    """The register's alerts use health's thresholds (kktd/states.py register_alarms): backlog warning and
    critical, FN expiring (warning) and expired (critical), no paper; and a shift left expired."""
    rules = {(name, severity): expr for name, severity, expr in alert_rules() if name.startswith("KktdRegister")}
    assert set(rules) == {
        ("KktdRegisterOfdBacklog", "warning"),
        ("KktdRegisterOfdBacklogCritical", "critical"),
        ("KktdRegisterFnExpiring", "warning"),
        ("KktdRegisterFnExpiring", "critical"),
        ("KktdRegisterNoPaper", "warning"),
        ("KktdRegisterShiftExpired", "warning"),
    }
    backlog = rules[("KktdRegisterOfdBacklog", "warning")]
    assert backlog.startswith("kktd_register_oldest_unsent_age_seconds >= ")
    assert days(backlog) == REGISTER_BACKLOG_WARN_S
    critical = rules[("KktdRegisterOfdBacklogCritical", "critical")]
    assert critical.startswith("kktd_register_oldest_unsent_age_seconds >= ")
    assert days(critical) == REGISTER_BACKLOG_CRITICAL_S
    expiring = rules[("KktdRegisterFnExpiring", "warning")]
    assert expiring.startswith("kktd_register_fn_valid_until_timestamp_seconds - time() < ")
    assert days(expiring) == FN_EXPIRY_WARN_S
    # Expired is health's error: the time left is 0 or less.
    assert rules[("KktdRegisterFnExpiring", "critical")] == (
        "time() - kktd_register_fn_valid_until_timestamp_seconds >= 0"
    )
    assert rules[("KktdRegisterNoPaper", "warning")] == "kktd_register_paper_present == 0"


def test_the_register_row_shows_every_register_gauge(tmp_path: Path) -> None:
    board = dashboard()
    panels = board["panels"]
    start = next(i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == "Register")
    end = next(i for i, p in enumerate(panels) if i > start and p["type"] == "row")
    shown = " ".join(t["expr"] for p in panels[start + 1 : end] for t in p["targets"])
    exported = {name for name in exported_sample_names(tmp_path) if name.startswith("kktd_register_")}
    assert len(exported) == 5, exported
    assert sorted(name for name in exported if name not in shown) == []
    # The thresholds drawn on the backlog panel are the alerts' (3 and 25 days).
    [oldest] = [p for p in panels[start + 1 : end] if "kktd_register_oldest_unsent_age_seconds" in str(p["targets"])]
    steps = [s["value"] for s in oldest["fieldConfig"]["defaults"]["thresholds"]["steps"]]
    assert steps == [None, REGISTER_BACKLOG_WARN_S, REGISTER_BACKLOG_CRITICAL_S]
