"""Test-side control of the power-cut filesystem: mount, cut, unmount, clean up."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support import wait_until

POWERFS = Path(__file__).with_name("powerfs.py")

# Lines for the terminal summary (tests/powercut/conftest.py prints them after the run).
SUMMARY: list[str] = []


def report(line: str) -> None:
    SUMMARY.append(line)
    print(line)


class PowerFsError(RuntimeError):
    pass


def mount_device(path: Path) -> str | None:
    """The "major:minor" of the mount at `path`, from the mount table, or None when not mounted.

    os.path.ismount and os.stat would fail with EIO on a frozen powerfs and call it unmounted.
    """
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as table:
        for line in table:
            fields = line.split()
            # The kernel escapes space, tab, newline and backslash in paths as octal.
            mount_point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if mount_point == target:
                return fields[2]
    return None


def is_mounted(path: Path) -> bool:
    return mount_device(path) is not None


class PowerFsMount:
    """One powerfs server process mounted over a backing directory.

    After `cut()` the filesystem is frozen (EIO everywhere); `unmount()` ends the process and the
    image directory can be the backing directory of the next `PowerFsMount`.
    """

    def __init__(self, backing: Path, mountpoint: Path, workdir: Path) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.control_path = workdir / f"{mountpoint.name}.ctl"
        self.log_path = workdir / f"{mountpoint.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- life cycle --------------------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> PowerFsMount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if is_mounted(self.mountpoint):
            raise PowerFsError(f"{self.mountpoint} is already a mount point")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(POWERFS),
                    "--backing",
                    str(self.backing),
                    "--mount",
                    str(self.mountpoint),
                    "--control",
                    str(self.control_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        wait_until(self._mounted_or_dead, timeout, f"powerfs to mount {self.mountpoint}", error=TimeoutError)
        return self

    def _mounted_or_dead(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise PowerFsError(f"powerfs exited with {self.proc.returncode} before mounting: {self.log_tail()}")
        if not (is_mounted(self.mountpoint) and self.control_path.exists()):
            return False
        try:
            return bool(self.request({"cmd": "ping"}).get("mounted"))
        except OSError:
            return False

    def unmount(self, timeout: float = 15.0) -> None:
        """Unmount and wait for the server to exit; a busy mount is retried until the deadline."""
        if self.proc is None:
            return
        deadline = time.monotonic() + timeout
        while is_mounted(self.mountpoint):
            result = subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
            if result.returncode == 0:
                break
            if time.monotonic() >= deadline:
                raise PowerFsError(f"cannot unmount {self.mountpoint}: {result.stderr.decode().strip()}")
            time.sleep(0.05)
        try:
            self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise PowerFsError(f"powerfs did not exit after unmount: {self.log_tail()}") from None
        returncode = self.proc.returncode
        self.proc = None
        if returncode != 0:
            raise PowerFsError(f"powerfs exited with {returncode}: {self.log_tail()}")

    def destroy(self) -> None:
        """Last-resort cleanup for fixtures: abort the connection, lazy-unmount, kill the server."""
        if is_mounted(self.mountpoint):
            self._abort_connection()
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
            if is_mounted(self.mountpoint):
                subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def _abort_connection(self) -> None:
        # Aborting makes every pending and future request fail at once, so nothing hangs in D state.
        device = mount_device(self.mountpoint)
        if device is None:
            return
        abort = Path(f"/sys/fs/fuse/connections/{device.split(':')[1]}/abort")
        if abort.exists():
            abort.write_text("1")

    def log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return "(no log)"

    # -- control channel ---------------------------------------------------------------------
    def request(self, command: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.control_path))
            sock.sendall(json.dumps(command).encode() + b"\n")
            with sock.makefile("rb") as stream:
                line = stream.readline()
        if not line:
            raise PowerFsError(f"powerfs closed the control socket: {self.log_tail()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def status(self) -> dict[str, Any]:
        return self._checked({"cmd": "status"})

    def cut(self, mode: str, seed: int, image: Path) -> dict[str, Any]:
        stats = self._checked({"cmd": "cut", "mode": mode, "seed": seed, "image": str(image)})
        if stats["model_errors"]:
            raise PowerFsError(
                f"the durability model disagreed with the live file {stats['model_errors']} "
                f"times; the image cannot be trusted: {self.log_tail()}"
            )
        return stats

    def ignore_fsync(self, value: bool = True) -> None:
        """From now on fsync and fsyncdir succeed without making anything durable."""
        self._checked({"cmd": "ignore_fsync", "value": value})

    def _checked(self, command: dict[str, Any]) -> dict[str, Any]:
        answer = self.request(command)
        if not answer.get("ok"):
            raise PowerFsError(f"powerfs refused {command['cmd']}: {answer.get('error')}")
        return answer


class PowerCutLab:
    """Chains mounts: mount a backing dir, cut into an image, mount the image, and so on.

    Every mount it starts is destroyed by `close()`, which fixtures call in a finally.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mountpoint = root / "mnt"
        self.generation = 0
        self.current: PowerFsMount | None = None
        self.last_image: Path | None = None
        self._all: list[PowerFsMount] = []

    def backing_dir(self) -> Path:
        path = self.root / f"disk{self.generation}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def mount(self, backing: Path | None = None) -> PowerFsMount:
        if self.current is not None:
            raise PowerFsError("unmount the current filesystem first")
        mount = PowerFsMount(backing or self.backing_dir(), self.mountpoint, self.root)
        self._all.append(mount)
        self.current = mount.start()
        return mount

    def cut_and_remount(
        self, mode: str, seed: int, before_unmount: Callable[[], None] = lambda: None
    ) -> dict[str, Any]:
        """Cut, let the caller kill what used the mount, unmount, mount the image in its place."""
        stats = self.cut(mode, seed, before_unmount)
        assert self.last_image is not None
        self.mount(self.last_image)
        return stats

    def cut(self, mode: str, seed: int, before_unmount: Callable[[], None] = lambda: None) -> dict[str, Any]:
        assert self.current is not None
        self.generation += 1
        self.last_image = self.root / f"disk{self.generation}"
        stats = self.current.cut(mode, seed, self.last_image)
        before_unmount()
        self.current.unmount()
        # The pre-crash disk is of no further use; long chains would otherwise fill /tmp.
        shutil.rmtree(self.current.backing)
        self.current = None
        return stats

    def unmount(self) -> None:
        if self.current is not None:
            self.current.unmount()
            self.current = None

    def close(self) -> None:
        for mount in self._all:
            mount.destroy()
        self.current = None
