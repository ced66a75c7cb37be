"""A throw-away systemd (PID 1 of new PID, mount, UTS and cgroup namespaces) for driving kktd's unit.

Layout: the host keeps a temp dir H with `seed/` (files copied over the sandbox's `/` before systemd
starts) and `fs/` (a mount point). Inside the new mount namespace a tmpfs is mounted on H/fs; it carries the
overlay's upper and work dirs, so nothing the sandbox writes reaches the host's disk. The host network
namespace is shared on purpose: tests talk to kktd on 127.0.0.1 directly.

Tear-down is SIGKILL to the sandbox's PID 1 (the kernel then kills every process in its PID namespace and
the private mounts vanish with the mount namespace), then removal of the cgroup subtree and of H.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import wait_until

BOOT_TARGET = "kktd-sandbox.target"
HOSTDIR_PREFIX = "kktd-sandbox-"
STALE_AFTER_S = 120
CONTAINER_NAME = "kktd-test"
SYSTEMD_BINARY = Path("/lib/systemd/systemd")
REQUIRED_TOOLS = ("unshare", "nsenter", "pivot_root", "mount", "umount", "setpriv")

# Units that would touch the host kernel (shared by all namespaces we do not unshare) or that have no
# business in a test sandbox. /proc/sys and /sys are read-only inside anyway; masking keeps the journal
# free of their condition-failure noise and keeps boot deterministic.
MASKED_UNITS = (
    "systemd-sysctl.service",
    "systemd-modules-load.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "systemd-random-seed.service",
    "systemd-pstore.service",
    "systemd-timesyncd.service",
    "systemd-firstboot.service",
    "systemd-repart.service",
    "systemd-hwdb-update.service",
    "systemd-udevd.service",
    "systemd-udev-trigger.service",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
    "kmod-static-nodes.service",
    "systemd-ask-password-console.path",
)

# Pulls in only sysinit.target (journald, tmpfiles, sysusers) and sockets.target: no gettys, no
# multi-user.target, no timers of the host's packages (apt-daily, man-db ...).
BOOT_TARGET_UNIT = """\
[Unit]
Description=kktd test sandbox
Requires=sysinit.target sockets.target
After=sysinit.target sockets.target
AllowIsolate=yes
"""

# Runs as PID 1 of the new namespaces, prepares the root and execs systemd (which stays PID 1).
BOOT_SCRIPT = r"""
set -euo pipefail
H=$1; CHECKOUT=$2; CONTAINER=$3; TARGET=$4
R=$H/fs/root
mount -t tmpfs -o mode=0755,size=2g kktd-sandbox "$H/fs"
mkdir -p "$H/fs/upper" "$H/fs/work" "$R"
mount -t overlay overlay -o "lowerdir=/,upperdir=$H/fs/upper,workdir=$H/fs/work" "$R"
mount -t proc proc "$R/proc"
# Kernel tunables are global (we share the host network namespace too): read-only in here.
mount --bind "$R/proc/sys" "$R/proc/sys"
mount -o remount,bind,ro "$R/proc/sys"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
# A minimal /dev like systemd-nspawn's, with /dev/console bound to a log file on the host.
mount -t tmpfs -o mode=0755,nosuid,size=4m kktd-sandbox-dev "$R/dev"
for n in null zero full random urandom tty; do
    touch "$R/dev/$n"; mount --bind "/dev/$n" "$R/dev/$n"
done
mkdir -p "$R/dev/pts" "$R/dev/shm" "$R/dev/mqueue"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev kktd-sandbox-shm "$R/dev/shm"
touch "$R/dev/console"; mount --bind "$H/console.log" "$R/dev/console"
ln -s /proc/self/fd "$R/dev/fd"
for n in 0:stdin 1:stdout 2:stderr; do ln -s "/proc/self/fd/${n%%:*}" "$R/dev/${n#*:}"; done
mount -t tmpfs -o mode=0755,nosuid,nodev,size=256m kktd-sandbox-run "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev,size=512m kktd-sandbox-tmp "$R/tmp"
# The checkout (and its venv) at the same path, read-only: an overlay of / does not show submounts, and
# the sandbox must never write into the host's checkout.
mkdir -p "$R$CHECKOUT"
mount --bind "$CHECKOUT" "$R$CHECKOUT"
mount -o remount,bind,ro "$R$CHECKOUT"
# CI may clone below /root (mode 0700): the unprivileged service user must reach the venv. The ancestors
# are overlay directories, so this changes the sandbox's view only, never the host.
d=$(dirname "$CHECKOUT")
while [ "$d" != / ]; do chmod o+x "$R$d"; d=$(dirname "$d"); done
hostname kktd-sandbox
mkdir -p "$R/oldroot"
cd "$R"
pivot_root . oldroot
# Seeded after pivot_root, so that absolute symlinks in the target tree resolve inside the sandbox.
cp -a "/oldroot$H/seed/." /
umount -l /oldroot
rmdir /oldroot
exec env -i container="$CONTAINER" PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --system --unit="$TARGET" --show-status=no </dev/null >/dev/console 2>&1
"""

_PR_SET_PDEATHSIG = 1


class SandboxError(RuntimeError):
    """The sandbox could not be booted or a command inside it failed."""


def missing_prerequisites() -> list[str]:
    """What this machine lacks to boot a sandbox (empty when everything is there)."""
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append("root privileges")
    missing += [f"{tool} (util-linux)" for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if not SYSTEMD_BINARY.exists():
        missing.append(f"{SYSTEMD_BINARY} (systemd)")
    # overlayfs is not checked here: it may be a module that mount(8) loads on demand; a kernel without
    # it fails the boot script with mount's own message.
    if _cgroup2_mountpoint() is None:
        missing.append("a mounted cgroup2 hierarchy")
    return missing


def _cgroup2_mountpoint() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype == "cgroup2":
            return Path(fields[4])
    return None


def _own_cgroup2_path() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise SandboxError("this process is in no cgroup2 cgroup")


@dataclass
class Sandbox:
    """A running disposable systemd; commands run inside with nsenter into all of its namespaces."""

    checkout: Path
    hostdir: Path
    cgroup: Path
    unshare: subprocess.Popen[bytes]
    pid: int = 0
    boot_notes: list[str] = field(default_factory=list)

    # -- running things inside -------------------------------------------------------------------------
    def _inside(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
        """The host command line that runs argv in all of the sandbox's namespaces, root and cwd."""
        environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "SYSTEMD_PAGER": ""}
        environment.update(env or {})
        cmd = ["nsenter", "--target", str(self.pid), "--all", "--root", "--wd", "--", "env", "-i"]
        return cmd + [f"{k}={v}" for k, v in environment.items()] + list(argv)

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs argv inside the sandbox and returns its output."""
        done = subprocess.run(self._inside(argv, env), capture_output=True, text=True, timeout=timeout, input=input)
        if check and done.returncode != 0:
            raise SandboxError(
                f"{' '.join(argv)!r} exited {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
            )
        return done

    def systemctl(self, *args: str, check: bool = True, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", "--no-ask-password", *args], check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show -p ...` as a dict (values as systemd prints them)."""
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, *extra: str) -> list[dict[str, object]]:
        """The unit's journal entries as dicts (journalctl -o json), after syncing the journal."""
        self.run(["journalctl", "--sync"], check=False)
        out = self.run(["journalctl", "--no-pager", "-o", "json", "-u", unit, *extra]).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def write_file(self, inside: str, content: str | bytes, mode: int = 0o644) -> None:
        """Writes a file inside the sandbox. Done by a process inside (not through /proc/PID/root), so
        that absolute symlinks on the way resolve in the sandbox and never into the host."""
        data = content.encode() if isinstance(content, str) else content
        script = 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"'
        argv = ["sh", "-c", script, "write_file", inside, f"{mode:o}"]
        done = subprocess.run(self._inside(argv), input=data, capture_output=True, timeout=60)
        if done.returncode != 0:
            raise SandboxError(f"writing {inside} failed: {done.stderr.decode(errors='replace')}")

    def read_file(self, inside: str) -> str:
        return self.run(["cat", "--", inside]).stdout

    def remove(self, inside: str) -> None:
        self.run(["rm", "-rf", "--one-file-system", "--", inside])

    def failed_units(self) -> list[str]:
        out = self.systemctl("list-units", "--failed", "--plain", "--no-legend", check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def host_pids(self) -> list[int]:
        """Host PIDs of every process in the sandbox (its whole cgroup subtree)."""
        return sorted(int(pid) for d in _cgroup_dirs(self.cgroup) for pid in (d / "cgroup.procs").read_text().split())

    def console_log(self) -> str:
        return (self.hostdir / "console.log").read_text(errors="replace")

    # -- lifecycle -------------------------------------------------------------------------------------
    def _find_pid1(self) -> bool:
        if self.unshare.poll() is not None:
            raise SandboxError(f"sandbox boot script exited {self.unshare.returncode}: {self._boot_log()}")
        children_file = Path(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children")
        children = children_file.read_text().split()
        if not children:
            return False
        self.pid = int(children[0])
        return True

    def _system_state(self) -> str:
        done = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
        return done.stdout.strip()

    def wait_booted(self, timeout: float) -> None:
        wait_until(self._find_pid1, 10, "the sandbox's PID 1 to appear", interval=0.1, error=SandboxError)
        states: list[str] = []

        def booted() -> bool:
            if self.unshare.poll() is not None:
                raise SandboxError(f"sandbox systemd died: {self.console_log()[-4000:]}")
            # Until the boot script has exec'ed systemd, nsenter would land in the host's root and could
            # ask a host systemd (on a developer's machine) instead of ours.
            if Path(f"/proc/{self.pid}/comm").read_text().strip() != "systemd":
                return False
            states.append(self._system_state())
            return states[-1] in ("running", "degraded")

        try:
            wait_until(booted, timeout, "the sandbox systemd to finish booting", interval=0.2, error=SandboxError)
        except SandboxError as exc:
            raise SandboxError(f"{exc}; last state {states[-1:]}; console: {self.console_log()[-4000:]}") from None
        if states[-1] == "degraded":
            # Acceptable: nothing kktd needs is among them; recorded so a report can show which.
            self.boot_notes.append(f"booted degraded, failed units: {self.failed_units()}")

    def _boot_log(self) -> str:
        log = self.hostdir / "boot.log"
        return log.read_text(errors="replace")[-4000:] if log.exists() else ""

    def close(self) -> None:
        """SIGKILL to PID 1, then remove the cgroup subtree and the host temp dir. Idempotent."""
        if self.unshare.poll() is None:
            if self.pid:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            else:
                self.unshare.kill()  # PID 1 not found yet: --kill-child takes it down with unshare
        try:
            # unshare reaps its child (the sandbox PID 1) and exits; killing it first would leave a zombie.
            self.unshare.wait(timeout=30)
        except subprocess.TimeoutExpired:
            # unshare --kill-child then SIGKILLs the sandbox PID 1 should it still be alive.
            self.unshare.kill()
            self.unshare.wait(timeout=30)
        _remove_cgroup_tree(self.cgroup)
        if str(self.hostdir) in Path("/proc/self/mountinfo").read_text():
            raise SandboxError(f"a sandbox mount leaked into the host mount namespace under {self.hostdir}")
        shutil.rmtree(self.hostdir)


def _remove_cgroup_tree(root: Path, timeout: float = 30) -> None:
    """rmdir the cgroup subtree bottom-up once the killed processes have actually left it."""
    if not root.exists():
        return

    def empty() -> bool:
        return all(not (d / "cgroup.procs").read_text().strip() for d in _cgroup_dirs(root))

    wait_until(empty, timeout, f"processes to leave {root}", interval=0.1, error=SandboxError)
    for directory in sorted(_cgroup_dirs(root), key=lambda p: len(p.parts), reverse=True):
        directory.rmdir()


def _cgroup_dirs(root: Path) -> list[Path]:
    return [Path(dirpath) for dirpath, _dirs, _files in os.walk(root)]


def reap_stale(cgroup_parent: Path) -> list[str]:
    """Removes what sandboxes of a hard-killed test run left behind (their processes died with it through
    PDEATHSIG, but an empty cgroup tree and a host temp dir remain). A live sandbox always has processes
    in its cgroup, so it is never touched."""
    reaped: list[str] = []
    for cgroup in cgroup_parent.glob(f"{HOSTDIR_PREFIX}*"):
        hostdir = Path(tempfile.gettempdir()) / cgroup.name
        # A concurrent run's sandbox is empty only for the moment between mkdir and joining it.
        if time.time() - cgroup.stat().st_mtime < STALE_AFTER_S:
            continue
        if any((d / "cgroup.procs").read_text().strip() for d in _cgroup_dirs(cgroup)):
            continue
        if hostdir.exists() and str(hostdir) in Path("/proc/self/mountinfo").read_text():
            continue
        _remove_cgroup_tree(cgroup, timeout=1)
        shutil.rmtree(hostdir, ignore_errors=True)
        reaped.append(cgroup.name)
    return reaped


def _seed(hostdir: Path, files: Mapping[str, str]) -> None:
    seed = hostdir / "seed"
    units = seed / "etc/systemd/system"
    units.mkdir(parents=True)
    (seed / "etc/hostname").write_text("kktd-sandbox\n")
    (units / BOOT_TARGET).write_text(BOOT_TARGET_UNIT)
    for unit in MASKED_UNITS:
        (units / unit).symlink_to("/dev/null")
    for inside, text in files.items():
        target = seed / inside.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


def _die_with_parent_and_join(cgroup: Path) -> Callable[[], None]:
    def preexec() -> None:
        # Runs in the child between fork and exec: a killed pytest must not leave a systemd behind, and
        # the cgroup namespace root of the sandbox must be our own fresh cgroup, not the host's.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        (cgroup / "cgroup.procs").write_text("0")

    return preexec


def boot(checkout: Path, files: Mapping[str, str] | None = None, timeout: float = 60) -> Sandbox:
    """Boots a sandbox showing `checkout` at the same path; `files` are placed into its / before boot."""
    cgroup_root = _cgroup2_mountpoint()
    if cgroup_root is None:
        raise SandboxError("no cgroup2 hierarchy is mounted")
    cgroup_parent = cgroup_root / _own_cgroup2_path().lstrip("/")
    reap_stale(cgroup_parent)
    hostdir = Path(tempfile.mkdtemp(prefix=HOSTDIR_PREFIX))
    cgroup = cgroup_parent / hostdir.name
    try:
        (hostdir / "fs").mkdir()
        (hostdir / "console.log").touch()
        _seed(hostdir, files or {})
        cgroup.mkdir()
        with open(hostdir / "boot.log", "wb") as log:
            proc = subprocess.Popen(
                [
                    "unshare",
                    "--pid",
                    "--fork",
                    "--mount",
                    "--uts",
                    "--cgroup",
                    "--kill-child",
                    "--propagation",
                    "private",
                    "--",
                    "bash",
                    "-c",
                    BOOT_SCRIPT,
                    "kktd-sandbox-boot",
                    str(hostdir),
                    str(checkout),
                    CONTAINER_NAME,
                    BOOT_TARGET,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent_and_join(cgroup),
            )
    except BaseException:
        if cgroup.exists():
            cgroup.rmdir()
        shutil.rmtree(hostdir)
        raise
    sandbox = Sandbox(checkout=checkout, hostdir=hostdir, cgroup=cgroup, unshare=proc)
    try:
        sandbox.wait_booted(timeout)
    except BaseException:
        sandbox.close()
        raise
    return sandbox
