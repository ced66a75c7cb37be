"""The shipped files that need no sandbox: the example config and the unit's promises to kktd's config."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from kktd import config as config_module

from .conftest import CHECKOUT

EXAMPLE = CHECKOUT / "systemd" / "kktd.toml"
UNIT = CHECKOUT / "systemd" / "kktd.service"


def _load(path: Path) -> config_module.Config:
    return config_module.load(argparse.Namespace(config=str(path)), environ={})


def test_example_config_lists_every_option_commented_out_with_its_default(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    commented = re.findall(r"^#([a-z_]+) = ", text, flags=re.MULTILINE)
    assert sorted(commented) == sorted(option.key for option in config_module.OPTIONS)
    assert not re.findall(r"^[a-z_]+ =", text, flags=re.MULTILINE), "the shipped file must set nothing"
    uncommented = tmp_path / "kktd.toml"
    uncommented.write_text(re.sub(r"^#([a-z_]+ = )", r"\1", text, flags=re.MULTILINE))
    assert _load(uncommented) == _load(EXAMPLE) == _load(Path(os.devnull))


def test_unit_stop_timeout_outlasts_the_default_drain_deadline() -> None:
    stop_timeout = re.search(r"^TimeoutStopSec=(\d+)s$", UNIT.read_text(), flags=re.MULTILINE)
    assert stop_timeout is not None
    drain = _load(Path(os.devnull)).drain_timeout
    assert int(stop_timeout.group(1)) >= 2 * drain


def test_unit_does_not_restart_on_the_exit_codes_that_need_an_operator() -> None:
    from kktd.cli import EX_CONFIG, EX_DATAERR, EX_IOERR

    prevent = re.search(r"^RestartPreventExitStatus=(.+)$", UNIT.read_text(), flags=re.MULTILINE)
    assert prevent is not None
    assert {int(code) for code in prevent.group(1).split()} == {EX_CONFIG, EX_DATAERR, EX_IOERR}


def test_unit_reloads_with_sighup() -> None:
    """kktd reloads on SIGHUP (kktd/daemon.py); systemd waits for its RELOADING=1 ... READY=1."""
    text = UNIT.read_text()
    assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", text, flags=re.MULTILINE)
    assert re.search(r"^Type=notify$", text, flags=re.MULTILINE)
