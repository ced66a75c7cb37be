"""The Debian package under test: built twice from the checkout, installed with apt-get in a sandbox.

Two builds of the same code: the package as `make deb` builds it, and the next upload a maintainer would
make of it (a bumped Debian revision whose example configuration, a conffile, gained a line). The upgrade
test installs one over the other; comparing the two shows the build is reproducible.
"""

from __future__ import annotations

import email.utils
import hashlib
import io
import re
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from .conftest import CHECKOUT, SYSUSERS_FILE, UNIT_FILE, VENV
from .kktd_unit import DROPIN_DIR, EXIT_LOG, KktdUnit
from .systemd_sandbox import Sandbox

BUILD_DEB = CHECKOUT / "packaging" / "build-deb.sh"
PACKAGE_DIR = "/var/cache/kktd-test"
VENV_INSIDE = "/usr/lib/kktd/venv"
CONFFILE = "etc/kktd/kktd.toml"
# The second build's conffile change: a new comment, as a new version's example config would have.
CONFFILE_ADDITION = "\n# (packaging test) This line is new in the next version of the package.\n"
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
# Conffile conflicts the Debian way, without a prompt: local edits stay, the new file lands as .dpkg-dist.
APT_OPTIONS = ("-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold")


@dataclass(frozen=True)
class Build:
    deb: Path
    version: str
    source: Path  # the laid-out source package it was built from
    seconds: float


@dataclass(frozen=True)
class Builds:
    first: Build
    second: Build  # same code, next Debian revision, changed conffile


def host_run(argv: list[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _changelog_field(source: Path, field: str) -> str:
    changelog = source / "debian" / "changelog"
    return host_run(["dpkg-parsechangelog", "-l", str(changelog), "-S", field]).stdout.strip()


def _bump_revision(source: Path) -> str:
    """Adds a changelog entry with the next Debian revision (same upstream version, same code)."""
    version = _changelog_field(source, "Version")
    upstream, revision = version.rsplit("-", 1)
    numbers = re.fullmatch(r"(.*?)(\d+)", revision)
    assert numbers is not None, version
    bumped = f"{upstream}-{numbers.group(1)}{int(numbers.group(2)) + 1}"
    maintainer = _changelog_field(source, "Maintainer")
    # An hour after the previous entry: later, as dpkg requires, and the same in every run.
    previous = email.utils.parsedate_to_datetime(_changelog_field(source, "Date"))
    when = email.utils.format_datetime(previous + timedelta(hours=1))
    changelog = source / "debian" / "changelog"
    entry = (
        f"kktd ({bumped}) unstable; urgency=medium\n\n"
        "  * Same code; the example configuration gains a comment (upgrade test).\n\n"
        f" -- {maintainer}  {when}\n\n"
    )
    changelog.write_text(entry + changelog.read_text())
    return bumped


def _build(source: Path, out: Path) -> Build:
    began = time.monotonic()
    host_run([str(BUILD_DEB), "build", str(source), str(out)])
    seconds = time.monotonic() - began
    version = _changelog_field(source, "Version")
    debs = sorted(out.glob(f"kktd_{version}_*.deb"))
    assert len(debs) == 1, debs
    return Build(debs[0], version, source, seconds)


def build_packages(workdir: Path) -> Builds:
    first_source = workdir / "first" / "kktd"
    host_run([str(BUILD_DEB), "stage", str(first_source)])
    second_source = workdir / "second" / "kktd"
    shutil.copytree(first_source, second_source, symlinks=True)
    _bump_revision(second_source)
    with open(second_source / "systemd" / "kktd.toml", "a") as example:
        example.write(CONFFILE_ADDITION)
    return Builds(_build(first_source, workdir / "out-first"), _build(second_source, workdir / "out-second"))


def package_files(deb: Path) -> dict[str, str]:
    """Every path in the package's data archive -> sha256 of a regular file, the target of a symlink, or
    "dir"."""
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    files: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for member in archive:
            if member.isfile():
                extracted = archive.extractfile(member)
                assert extracted is not None
                files[member.name] = hashlib.sha256(extracted.read()).hexdigest()
            elif member.issym():
                files[member.name] = f"-> {member.linkname}"
            else:
                files[member.name] = "dir"
    return files


def control_field(deb: Path, field: str) -> str:
    return host_run(["dpkg-deb", "--field", str(deb), field]).stdout.strip()


class PackagedKktd(KktdUnit):
    """kktd installed from its .deb (the package, not the tests, installs the unit and creates the user).
    Uses KktdUnit's HTTP, journal and mock OFD helpers; the mock OFD runs from the checkout's venv."""

    def __init__(self, sandbox: Sandbox) -> None:
        super().__init__(sandbox, UNIT_FILE, SYSUSERS_FILE, VENV)

    def install(self) -> None:
        raise NotImplementedError("installed with apt-get, see install_package()")

    def prepare(self) -> None:
        """A test drop-in before the package arrives, as an operator's `systemctl edit kktd` would be."""
        # The machine image this runs on is a container whose policy-rc.d (exit 101) forbids starting
        # services from maintainer scripts; a POS terminal has none. Removed from the sandbox's overlay only.
        self.sandbox.run(["rm", "-f", "/usr/sbin/policy-rc.d"])
        self.sandbox.write_file(f"{DROPIN_DIR}/10-test-package.conf", self.package_dropin())

    def package_dropin(self) -> str:
        return (
            "\n".join(
                [
                    "# Written by tests/systemd: ports of this test run, quick OFD retries, and a record of exits.",
                    "[Service]",
                    # The sandbox shares the host's network: the default port 8731 may be taken.
                    f"Environment=KKTD_LISTEN=127.0.0.1:{self.port} KKTD_OFD_URL={self.ofd_url}",
                    "Environment=KKTD_SYNC_INTERVAL=0.2 KKTD_BACKOFF_MAX=0.5 KKTD_BREAKER_RESET=0.5",
                    # Intake lines ("receipt <id> accepted") are debug level, kept out of a busy till's journal.
                    "Environment=KKTD_LOG_LEVEL=debug",
                    f"ExecStopPost=+/bin/sh -c 'echo \"$SERVICE_RESULT $EXIT_CODE $EXIT_STATUS\" >> {EXIT_LOG}'",
                ]
            )
            + "\n"
        )

    def operator_env(self) -> dict[str, str]:
        """What an operator's shell needs to reach this test's kktd (the drop-in sets it for the unit)."""
        return {"KKTD_LISTEN": f"127.0.0.1:{self.port}", "KKTD_OFD_URL": self.ofd_url}

    def apt(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.sandbox.run(["apt-get", "-y", "-q", *APT_OPTIONS, *args], env=APT_ENV, timeout=300, check=check)

    def install_package(self, deb: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        inside = f"{PACKAGE_DIR}/{deb.name}"
        self.sandbox.write_file(inside, deb.read_bytes())
        return self.apt("install", "--no-install-recommends", *extra, inside)

    def sqlite(self, database: str, sql: str) -> str:
        """sqlite3 as the kktd user, so that no root-owned -wal/-shm file is left for the service."""
        return self.sandbox.run(["runuser", "-u", "kktd", "--", "sqlite3", database, sql]).stdout.strip()

    def exists(self, path: str) -> bool:
        return self.sandbox.run(["test", "-e", path], check=False).returncode == 0

    def kept_state_dirs(self) -> list[str]:
        done = self.sandbox.run(["sh", "-c", "ls -d /var/lib/kktd.purged-* 2>/dev/null || true"])
        return done.stdout.split()

    def exposure(self) -> float:
        """`systemd-analyze security kktd` of the installed unit, as the running systemd sees it."""
        out = self.sandbox.run(["systemd-analyze", "security", "--no-pager", "kktd.service"], check=False)
        found = re.search(r"Overall exposure level for kktd\.service: ([0-9.]+)", out.stdout + out.stderr)
        assert found, out.stdout[-2000:] + out.stderr[-2000:]
        return float(found.group(1))
