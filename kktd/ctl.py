"""The operator CLI: `kktd status`, `kktd receipt ID`, `kktd dlq list|requeue|resolve`, `kktd shift status|open|close`,
`kktd sync-now`, `kktd export`.

Each command talks to the running daemon over its HTTP API, at the address of the same configuration the
daemon reads (`listen`). Exit codes follow the monitoring-plugin convention, so `kktd status` works as a
Nagios / Icinga / Zabbix check as it is: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (the daemon cannot be
reached or answered something unexpected). The first line of `kktd status` is a plugin status line with
performance data after `|`.

Plain urllib, not aiohttp: a support engineer types these on a slow terminal, and a synchronous client
starts faster and streams `export` line by line without an event loop.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from datetime import time as dt_time
from typing import IO, Any

from kktd.states import AlarmLevel, HealthStatus

DEFAULT_TIMEOUT_S = 10.0
# Arguments that are not UTF-8 reach Python as lone surrogates: sent as the bytes they were (kktd refuses them
# with its own answer), never a traceback here.
ARGV_ERRORS = "surrogateescape"
EXPORT_CHUNK = 64 * 1024
DLQ_PAGE = 500
COMMANDS = ("status", "receipt", "dlq", "shift", "sync-now", "export")


class State(enum.IntEnum):
    """Monitoring-plugin states, which are also the exit codes."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


class Unreachable(Exception):
    """The daemon could not be asked (connection refused, timeout, not kktd's answer)."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any


@dataclass
class Report:
    """What a command found: its state (the exit code), a readable rendering and the JSON for --json."""

    state: State
    lines: list[str]
    data: Any = None
    colour_lines: dict[int, State] = field(default_factory=dict)  # line index -> state to colour it with


# ---- talking to the daemon ----


class Client:
    def __init__(self, base_url: str, timeout: float = DEFAULT_TIMEOUT_S, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        # The daemon's API token (api_token_file / the api_token credential), when it has one: it also shows
        # `receipt` and `export` the customer contacts whole (without a token configured they come masked).
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}

    def _open(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.base_url}{path}",
            data=data,
            method=method,
            headers={
                "Accept": "application/json",
                **self._auth,
                **({"Content-Type": "application/json"} if data else {}),
            },
        )
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            return error  # an HTTP answer all the same: the caller reads its status and body
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"kktd is not reachable at {self.base_url}: {reason}") from None

    def call(self, method: str, path: str, body: Any = None) -> Answer:
        response = self._open(method, path, body)
        try:
            raw = response.read()
        except OSError as exc:
            raise Unreachable(f"kktd at {self.base_url} stopped answering: {exc}") from None
        finally:
            response.close()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            raise Unreachable(
                f"{self.base_url}{path} did not answer JSON (HTTP {response.status}): is it kktd?"
            ) from None
        return Answer(response.status, parsed)

    def stream(self, path: str) -> Iterator[bytes]:
        """The body of a GET in chunks, as it arrives (for answers of any size)."""
        response = self._open("GET", path)
        try:
            if response.status != 200:
                raw = response.read()
                raise Unreachable(f"GET {path}: HTTP {response.status}: {_error_text(raw)}")
            while True:
                try:
                    chunk = response.read1(EXPORT_CHUNK)
                except OSError as exc:
                    raise Unreachable(f"kktd at {self.base_url} stopped answering: {exc}") from None
                if not chunk:
                    return
                yield chunk
        finally:
            response.close()


def _error_text(raw: bytes) -> str:
    try:
        error = json.loads(raw)["error"]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode(errors="replace")


def _error_of(answer: Answer) -> str:
    body = answer.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return f"{body['error'].get('code')}: {body['error'].get('message')}"
    return f"HTTP {answer.status}"


def base_url(listen_host: str, listen_port: int) -> str:
    """Where to reach a daemon that listens on listen_host (a wildcard address is reached on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen_host, listen_host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{listen_port}"


# ---- readable rendering ----


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"
    return f"{seconds // 86400:.0f}d{seconds % 86400 // 3600:02.0f}h"


def human_bytes(count: float | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def since(timestamp: str | None, now: float) -> str:
    if not timestamp:
        return "never"
    try:
        moment = datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return timestamp
    return f"{timestamp} ({human_age(now - moment)} ago)"


def use_colour(stream: IO[str], environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Colour only on a terminal, and never with NO_COLOR set to anything (https://no-color.org)."""
    if environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and environ.get("TERM") != "dumb"


COLOURS = {State.OK: "\033[32m", State.WARNING: "\033[33m", State.CRITICAL: "\033[31m", State.UNKNOWN: "\033[35m"}
RESET = "\033[0m"


def render(report: Report, colour: bool) -> str:
    lines = list(report.lines)
    if colour:
        for index, state in report.colour_lines.items():
            if 0 <= index < len(lines):
                lines[index] = f"{COLOURS[state]}{lines[index]}{RESET}"
    return "\n".join(lines)


# ---- the commands ----


def _need(answer: Answer, *expected: int) -> Any:
    if answer.status not in expected or answer.body is None:
        raise Unreachable(f"unexpected answer from kktd: {_error_of(answer)}")
    return answer.body


def status(client: Client, now: float | None = None) -> Report:
    now = time.time() if now is None else now
    buffer = _need(client.call("GET", "/v1/kkt/buffer/status"), 200)
    health = _need(client.call("GET", "/v1/health"), 200, 503)
    counts = buffer.get("counts", {})
    pending = int(counts.get("pending", 0)) + int(counts.get("submitted", 0))
    failed = int(counts.get("failed", 0))
    sync = buffer.get("sync") or {}
    alarm = buffer.get("oldest_pending_alarm", AlarmLevel.OK)
    oldest = buffer.get("oldest_pending_age_s")

    state = {HealthStatus.OK: State.OK, HealthStatus.WARNING: State.WARNING}.get(health.get("status"), State.CRITICAL)
    reasons = list(health.get("problems", [])) + list(health.get("warnings", []))
    if alarm == AlarmLevel.CRITICAL:
        state = max(state, State.CRITICAL)
    elif alarm == AlarmLevel.WARNING:
        state = max(state, State.WARNING)
    if failed:
        state = max(state, State.WARNING)
        reasons.append(f"{failed} dead letters")
    breaker = sync.get("breaker", "unknown")
    reachability = _reachability(sync)

    summary = (
        f"{pending} pending"
        + (f", oldest {human_age(oldest)}" if oldest is not None else "")
        + f", upstream {reachability}"
    )
    if reasons:
        summary += "; " + "; ".join(reasons)
    perfdata = (
        f"pending={pending};;;0;{buffer.get('capacity', '')} failed={failed};1;;0 "
        f"oldest_pending_age={float(oldest or 0):.0f}s db_size={int(buffer.get('db_size_bytes') or 0)}B"
    )
    capacity = buffer.get("capacity") or 0
    fill = f", {100 * float(buffer.get('fill_ratio', 0)):.1f}% full" if capacity else ""
    lines = [
        f"KKTD {state.name} - {summary} | {perfdata}",
        f"  pending        {pending} (capacity {capacity}{fill})",
        f"  oldest         {human_age(oldest) if oldest is not None else 'nothing pending'} (alarm: {alarm})",
        f"  upstream       {reachability}, breaker {breaker}",
        f"  last delivery  {since(sync.get('last_success_at'), now)}",
        f"  last error     {sync.get('last_error') or '-'}",
        f"  dead letters   {failed}",
        f"  sent           {counts.get('sent', 0)}",
        f"  database       {human_bytes(buffer.get('db_size_bytes'))}",
    ]
    register = buffer.get("register")
    if isinstance(register, dict):
        lines.append(f"  register       {_register_line(register)}")
    colour_lines = {
        0: state,
        2: _alarm_state(alarm),
        3: State.OK if breaker == "closed" else State.WARNING,
        6: State.WARNING if failed else State.OK,
    }
    return Report(state, lines, {"state": state.name, "status": buffer, "health": health}, colour_lines)


def _register_line(register: dict[str, Any]) -> str:
    """A register upstream's own report: shift, OFD backlog, FN expiry, paper."""
    if register.get("shift") is None:
        return f"no report yet{': ' + str(register['error']) if register.get('error') else ''}"
    shift = register["shift"]
    parts = [f"shift {shift.get('state')} (number {shift.get('number')})"]
    unsent = register.get("unsent_documents") or 0
    parts.append(
        f"{unsent} documents not sent to the OFD (oldest {register.get('oldest_unsent_at')})" if unsent else "OFD sent"
    )
    if register.get("fn_valid_until"):
        parts.append(f"FN valid until {register['fn_valid_until'][:10]}")
    parts.append("paper ok" if register.get("paper_present") else "NO PAPER")
    return ", ".join(parts)


def _reachability(sync: dict[str, Any]) -> str:
    if not sync:
        return "unknown (no sync loop)"
    if sync.get("breaker") == "open":
        return "unreachable"
    last_ok, last_error = sync.get("last_success_at"), sync.get("last_error_at")
    if last_ok and (not last_error or last_ok >= last_error):
        return "reachable"
    if last_error:
        return "failing"
    return "not contacted yet"


def _alarm_state(alarm: str) -> State:
    states: dict[str, State] = {AlarmLevel.OK: State.OK, AlarmLevel.WARNING: State.WARNING}
    return states.get(alarm, State.CRITICAL)


def _segment(text: str) -> str:
    return urllib.parse.quote(text, safe="", errors=ARGV_ERRORS)


def _query(values: dict[str, str]) -> str:
    return urllib.parse.urlencode(values, errors=ARGV_ERRORS)


def receipt(client: Client, receipt_id: str | None, idempotency_key: str | None = None) -> Report:
    if idempotency_key is not None:
        path, wanted = (
            f"/v1/kkt/receipt?{_query({'idempotency_key': idempotency_key})}",
            "key ",
        )
    else:
        path, wanted = f"/v1/kkt/receipt/{_segment(receipt_id or '')}", ""
    answer = client.call("GET", path)
    if answer.status == 404:
        shown = idempotency_key if idempotency_key is not None else receipt_id
        return Report(State.CRITICAL, [f"no receipt {wanted}{shown}"], answer.body, {0: State.CRITICAL})
    body = _need(answer, 200)
    status_name = body.get("status", "?")
    state = {"sent": State.OK, "failed": State.CRITICAL}.get(status_name, State.WARNING)
    lines = [
        f"receipt {body.get('receipt_id')}: {status_name}",
        f"  idempotency key  {body.get('idempotency_key')}",
        f"  total            {_rubles(body.get('total'))}",
        f"  accepted         {body.get('accepted_at')}",
        f"  updated          {body.get('updated_at')}",
        f"  attempts         {body.get('attempts')}",
        f"  last error       {body.get('last_error') or '-'}",
    ]
    fiscal = body.get("ofd") or body.get("fiscal")
    if fiscal:
        lines.append("  fiscal data")
        lines += [f"    {key:<22} {value}" for key, value in fiscal.items() if value is not None]
    return Report(state, lines, body, {0: state})


def _rubles(kopecks: Any) -> str:
    if not isinstance(kopecks, int):
        return str(kopecks)
    return f"{kopecks // 100}.{kopecks % 100:02d} RUB"


def dlq_list(client: Client) -> Report:
    letters: list[dict[str, Any]] = []
    after = 0
    while True:
        page = _need(client.call("GET", f"/v1/kkt/dlq?limit={DLQ_PAGE}&after_seq={after}"), 200)
        rows = page.get("dead_letters", [])
        letters += rows
        next_seq = page.get("next_after_seq")
        if not rows or not isinstance(next_seq, int):
            break
        after = next_seq
    if not letters:
        return Report(State.OK, ["no dead letters"], {"dead_letters": [], "count": 0}, {0: State.OK})
    lines = [f"{len(letters)} dead letters"]
    lines += [
        f"  {row.get('receipt_id')}  {row.get('updated_at')}  attempts={row.get('attempts')}  "
        f"{row.get('last_error') or '-'}"
        for row in letters
    ]
    return Report(State.WARNING, lines, {"dead_letters": letters, "count": len(letters)}, {0: State.WARNING})


def dlq_requeue(client: Client, receipt_ids: Sequence[str] | None) -> Report:
    """Requeue the given dead letters, or (None) every dead letter there is now: the list is taken first, so
    a receipt that fails again meanwhile is not requeued twice."""
    if receipt_ids is None:
        listed = dlq_list(client).data["dead_letters"]
        receipt_ids = [row["receipt_id"] for row in listed]
    return _each_dead_letter(client, receipt_ids, "requeue", {}, "requeued")


def dlq_resolve(client: Client, receipt_ids: Sequence[str], reason: str) -> Report:
    """Close the given dead letters with the operator's reason (kept for audit; never sent)."""
    return _each_dead_letter(client, receipt_ids, "resolve", {"reason": reason}, "resolved")


def _each_dead_letter(client: Client, receipt_ids: Sequence[str], action: str, body: Any, done_word: str) -> Report:
    """POST /v1/kkt/dlq/{id}/{action} for each; OK when all worked, CRITICAL when none did."""
    done: list[str] = []
    problems: list[str] = []
    for receipt_id in receipt_ids:
        answer = client.call("POST", f"/v1/kkt/dlq/{_segment(receipt_id)}/{action}", body)
        if answer.status == 200:
            done.append(receipt_id)
        else:
            problems.append(f"{receipt_id}: {_error_of(answer)}")
    state = State.OK if not problems else State.CRITICAL if not done else State.WARNING
    lines = [f"{done_word} {len(done)} of {len(receipt_ids)}"] + [f"  {p}" for p in problems]
    return Report(state, lines, {done_word: done, "failed": problems}, {0: state})


def sync_now(client: Client) -> Report:
    body = _need(client.call("POST", "/v1/kkt/buffer/sync", {}), 200)
    error = body.get("error")
    state = State.WARNING if error else State.OK
    lines = [
        f"delivered {body.get('delivered', 0)}, rejected {body.get('rejected', 0)}, "
        f"dead-lettered {body.get('dead_lettered', 0)} in {body.get('batches', 0)} batches; "
        f"{body.get('pending', 0)} pending, breaker {body.get('breaker')}"
    ]
    if error:
        lines.append(f"  error: {error}")
    return Report(state, lines, body, {0: state})


def shift(client: Client, command: str) -> Report:
    """The register's shift: its state, or open it, or close it (the Z report). Only for a register upstream."""
    if command == "status":
        answer = client.call("GET", "/v1/kkt/shift", None)
    else:
        answer = client.call("POST", f"/v1/kkt/shift/{command}", {})
    if answer.status != 200:
        error = _error_of(answer)
        return Report(State.CRITICAL, [f"shift {command}: {error}"], {"error": error}, {0: State.CRITICAL})
    body = answer.body if isinstance(answer.body, dict) else {}
    state = State.WARNING if body.get("state") == "expired" else State.OK
    done = {"status": "", "open": "opened; ", "close": "closed (Z report printed); "}[command]
    line = f"shift {done}now {body.get('state')}, number {body.get('number')}"
    if body.get("expires_at"):
        line += f", its 24 hours end at {body['expires_at']}"
    return Report(state, [line], body, {0: state})


def parse_moment(text: str) -> str:
    """--since / --until: a date is the terminal's local midnight (its zone, as a till's day is); a time
    must carry its zone (a bare 10:00 would be a guess). As RFC 3339 UTC for the API."""
    try:
        day = date.fromisoformat(text) if len(text) == 10 else None
        moment = datetime.combine(day, dt_time()).astimezone() if day else datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date or an RFC 3339 time (e.g. 2026-11-01 or 2026-11-01T00:00:00+03:00)"
        ) from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no zone: give one (2026-11-01T10:00:00+03:00, ...Z) or a date alone for local midnight"
        )
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def local_zone() -> str:
    """The terminal's zone as the help names it: "MSK, UTC+03:00"."""
    now = datetime.now().astimezone()
    offset = f"{now:%z}"
    return f"{now.tzname()}, UTC{offset[:3]}:{offset[3:]}"


def export(client: Client, since_at: str | None, until_at: str | None, out: IO[bytes]) -> State:
    """Receipts as JSON lines, streamed to `out` as they arrive: any size, constant memory."""
    query = urllib.parse.urlencode({k: v for k, v in (("since", since_at), ("until", until_at)) if v})
    for chunk in client.stream(f"/v1/kkt/receipts{'?' + query if query else ''}"):
        out.write(chunk)
    out.flush()
    return State.OK


# ---- the command line ----


def add_commands(commands: Any, add_config_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the operator commands to `kktd`'s subparsers."""

    def options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        add_config_arguments(parser)
        parser.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
        parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for kktd")
        return parser

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return options(commands.add_parser(name, help=help_text))

    command("status", "summary of the running daemon (a monitoring-plugin check: exit 0/1/2/3)")
    one = command("receipt", "one receipt: status, attempts, last error, fiscal data")
    one.add_argument("receipt_id", nargs="?", help="kktd's receipt id (or --key)")
    one.add_argument("--key", dest="idempotency_key", help="the till's idempotency key instead of the id")
    # The options go on the leaves: argparse lets a subcommand's defaults overwrite its parent's values.
    dlq = commands.add_parser("dlq", help="dead letters: list, requeue, resolve")
    actions = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    options(actions.add_parser("list", help="list the dead letters"))
    requeue = options(actions.add_parser("requeue", help="put dead letters back in the queue"))
    requeue.add_argument("receipt_ids", nargs="*", default=[], metavar="ID")
    requeue.add_argument("--all", action="store_true", help="every dead letter there is now")
    resolve = options(actions.add_parser("resolve", help="close dead letters that will never be sent (kept)"))
    resolve.add_argument("receipt_ids", nargs="+", metavar="ID")
    resolve.add_argument("--reason", required=True, help="why (kept with the receipt and in the journal)")
    shifts = commands.add_parser("shift", help="the register's shift: status, open, close (Z report)")
    shift_actions = shifts.add_subparsers(dest="shift_command", required=True, metavar="ACTION")
    options(shift_actions.add_parser("status", help="the register's shift: open, closed or expired"))
    options(shift_actions.add_parser("open", help="open the register's shift"))
    closing = options(shift_actions.add_parser("close", help="close the register's shift (prints the Z report)"))
    # A Z report is printed, and the queue may hold receipts before it.
    closing.set_defaults(timeout=60.0)
    command("sync-now", "run one delivery cycle now and say what it did")
    exporting = command("export", "receipts as JSON lines, for audits (streamed, any size)")
    moments = f"a date (midnight in the terminal's zone, {local_zone()}) or an RFC 3339 time with its zone"
    exporting.add_argument("--since", type=parse_moment, help=f"accepted at or after: {moments}")
    exporting.add_argument("--until", type=parse_moment, help=f"accepted before: {moments}")


def add_config_arguments(parser: argparse.ArgumentParser, unset: Any = argparse.SUPPRESS) -> None:
    """Where the daemon is: the same config file and KKTD_LISTEN it reads, or --listen.

    Given before the command (`kktd --listen … status`) or after it; an unset flag after it leaves the
    one before it standing (SUPPRESS), the top-level parser's own default is None.
    """
    parser.add_argument(
        "--config", default=unset, help="kktd's TOML config file (default /etc/kktd/kktd.toml if it exists)"
    )
    parser.add_argument("--listen", default=unset, help="HOST:PORT of the daemon (default: `listen` from the config)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kktd", description="Operate a running kktd.")
    add_config_arguments(parser, unset=None)
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"), add_config_arguments)
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.command == "receipt" and (args.receipt_id is None) == (args.idempotency_key is None):
        parser.error("receipt: give a receipt ID or --key IDEMPOTENCY_KEY (one of them)")
    if args.command == "dlq" and args.dlq_command == "requeue" and bool(args.all) == bool(args.receipt_ids):
        parser.error("dlq requeue: give receipt IDs or --all (not both)")


def main(argv: Sequence[str] | None = None) -> int:
    """`kktd status` & co.; a configuration that cannot be read is UNKNOWN (3), like an absent daemon."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    return run_with_config(args)


def run_with_config(args: argparse.Namespace) -> int:
    """Run an operator command at the address of the configuration (`--config`, KKTD_*, `--listen`)."""
    from kktd import config as config_module
    from kktd.errors import ConfigError

    try:
        config = config_module.load(args)
    except ConfigError as exc:
        print(f"KKTD UNKNOWN - configuration error: {exc}", file=sys.stdout)
        return int(State.UNKNOWN)
    return run(args, base_url(config.listen_host, config.listen_port), token=config.api_token)


def run(
    args: argparse.Namespace,
    url: str,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    stdout_bytes: IO[bytes] | None = None,
    token: str | None = None,
) -> int:
    """Run one operator command against the daemon at `url`; returns the exit code."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    client = Client(url, args.timeout, token)
    try:
        if args.command == "export":
            return int(export(client, args.since, args.until, stdout_bytes or sys.stdout.buffer))
        report = _report(args, client)
    except Unreachable as exc:
        if args.json:
            print(json.dumps({"state": State.UNKNOWN.name, "error": str(exc)}), file=stdout)
        else:
            print(
                render(Report(State.UNKNOWN, [f"KKTD UNKNOWN - {exc}"], None, {0: State.UNKNOWN}), use_colour(stdout)),
                file=stdout,
            )
        return int(State.UNKNOWN)
    except BrokenPipeError:
        # `kktd export | head`: the reader went away; not an error of kktd's.
        stderr.close()
        return int(State.OK)
    if args.json:
        print(json.dumps(report.data, ensure_ascii=False, indent=2), file=stdout)
    else:
        print(render(report, use_colour(stdout)), file=stdout)
    return int(report.state)


def _report(args: argparse.Namespace, client: Client) -> Report:
    if args.command == "status":
        return status(client)
    if args.command == "receipt":
        return receipt(client, args.receipt_id, args.idempotency_key)
    if args.command == "sync-now":
        return sync_now(client)
    if args.command == "shift":
        return shift(client, args.shift_command)
    if args.command == "dlq" and args.dlq_command == "list":
        return dlq_list(client)
    if args.command == "dlq" and args.dlq_command == "resolve":
        return dlq_resolve(client, args.receipt_ids, args.reason)
    if args.command == "dlq" and args.dlq_command == "requeue":
        return dlq_requeue(client, None if args.all else args.receipt_ids)
    raise ValueError(f"not an operator command: {args.command}")


if __name__ == "__main__":
    sys.exit(main())
