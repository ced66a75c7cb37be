"""Entry points: `kktd serve`, `kktd check-config`, `kktd check-db`, each upstream's mock (`kktd mock-…`, from
the upstream registry), and the operator commands (`kktd status`, `receipt`, `dlq`, `sync-now`, `export`:
kktd/ctl.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kktd import __version__, ctl, logs
from kktd import config as config_module
from kktd.errors import ConfigError, CorruptDatabase, StorageUnavailable
from kktd.upstreams import mocks

if TYPE_CHECKING:
    from kktd.daemon import Extension, Reloader

log = logging.getLogger("kktd")

# sysexits.h codes, so systemd units can tell "do not restart" (bad config, corrupt data) from a crash.
EX_OK = 0
EX_DATAERR = 65
EX_SOFTWARE = 70
EX_UNAVAILABLE = 69
EX_IOERR = 74
EX_CONFIG = 78


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kktd", description="Fiscal receipt buffer and upstream forwarder.")
    parser.add_argument("--version", action="version", version=f"kktd {__version__}")
    ctl.add_config_arguments(parser, unset=None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    config_module.add_arguments(serve)
    check = commands.add_parser("check-config", help="validate the configuration and print it")
    config_module.add_arguments(check)
    check_db = commands.add_parser("check-db", help="check a buffer database's integrity")
    check_db.add_argument("path", type=Path)
    for command, mock in mocks().items():
        commands.add_parser(command, help=f"{mock.help} (see `kktd {command} --help`)", add_help=False)
    ctl.add_commands(commands, ctl.add_config_arguments)
    return parser


def main(argv: Sequence[str] | None = None, extension: Extension | None = None) -> int:
    """`extension` adds to the assembled daemon before it serves (only the test-only entry point sets it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    mock = mocks().get(argv[0]) if argv else None
    if mock is not None:
        return mock.main(argv[1:])  # a development tool outside the daemon's code, imported only now
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ctl.COMMANDS:
        ctl.check_arguments(parser, args)
        return ctl.run_with_config(args)
    if args.command == "check-db":
        return check_db(args.path)
    try:
        config = config_module.load(args)
    except ConfigError as exc:
        for problem in exc.problems:  # every problem at once, one line each
            print(f"kktd: configuration error: {problem}", file=sys.stderr)
        return EX_CONFIG
    if args.command == "check-config":
        try:
            print(json.dumps(config.describe(), indent=2, ensure_ascii=False))
        except BrokenPipeError:  # `kktd check-config | head`: the reader went away, the config is valid
            sys.stderr.close()
        return EX_OK
    logs.setup(config.log_level)
    return serve(config, extension, reloader=lambda: config_module.load(args))


def serve(config: config_module.Config, extension: Extension | None = None, reloader: Reloader | None = None) -> int:
    from kktd.daemon import Daemon  # imports aiohttp & co. only for the command that needs them

    # The welcome and its sample curl only once the port is ours: with the port taken, nothing misleads.
    welcome = (lambda: _print_welcome(config)) if config.embedded_mock else None
    try:
        return asyncio.run(Daemon(config, extension, reloader, on_ready=welcome).run())
    except CorruptDatabase as exc:
        log.critical(
            "%s; kktd will not start on it and will not replace it. Inspect it with "
            "`kktd check-db %s`, restore a backup or move it aside.",
            exc,
            config.db,
        )
        return EX_DATAERR
    except StorageUnavailable as exc:
        log.critical("storage unavailable at start: %s", exc)
        return EX_IOERR
    except OSError as exc:
        log.critical("cannot listen on %s: %s", config.listen, exc.strerror or exc)
        return EX_UNAVAILABLE
    except Exception:
        log.critical("kktd crashed", exc_info=True)
        return EX_SOFTWARE


def check_db(path: Path) -> int:
    from kktd.store import check_database

    problems = check_database(path)
    if problems:
        for problem in problems:
            print(f"kktd check-db: {problem}", file=sys.stderr)
        return EX_DATAERR
    print(f"kktd check-db: {path}: ok")
    return EX_OK


def _print_welcome(config: config_module.Config) -> None:
    from kktd.receipt import sample_receipt

    sample = json.dumps(sample_receipt("demo-KEY"), ensure_ascii=False).replace("demo-KEY", "demo-'$(date +%s%N)'")
    url = f"http://{config.listen}"
    program = Path(sys.argv[0]).absolute() if sys.argv else Path("kktd")
    cli = str(program) if program.name == "kktd" else "kktd"  # .venv/bin/kktd is not on PATH after make run
    if config.listen != config_module.DEFAULT_LISTEN:
        cli += f" --listen {config.listen}"
    print(
        f"""
kktd {__version__} (development mode: embedded mock of {config.upstream}, database {config.db})
Listening on {url}. Post a sample receipt:

  curl -sS -H 'Content-Type: application/json' -d '{sample}' {url}/v1/kkt/receipt

Then: curl -sS {url}/v1/kkt/buffer/status    (Ctrl-C stops kktd)
The CLI, from another terminal: {cli} status    (or: make ctl ARGS='status'; also receipt ID, dlq, export)
""",
        file=sys.stderr,
        flush=True,
    )
