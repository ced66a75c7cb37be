"""A FUSE passthrough filesystem that models what a disk holds after a power cut.

Run as its own process (a FUSE server inside the process that uses the mount deadlocks easily):

    python powerfs.py --backing DIR --mount MOUNTPOINT --control SOCKET

The backing directory holds the live state, i.e. what the page cache would show. Next to it the
server keeps, in memory, the durable state:

* file data becomes durable only at fsync/fdatasync of that file: until then every write and
  truncate is kept as a pending record (offset, bytes) / (size) against the durable content;
* a directory entry (create, unlink, rename, mkdir, rmdir) becomes durable only at fsync of its
  directory; until then it is a pending directory operation;
* everything present in the backing directory at mount time is durable.

The control socket (one JSON object per line, one answer per line) understands
``{"cmd": "ping"}``, ``{"cmd": "status"}`` and
``{"cmd": "cut", "mode": "clean"|"torn", "seed": int, "image": DIR}``. A cut freezes the
filesystem (every later operation fails with EIO) and writes the post-crash image into DIR:
``clean`` drops every pending write and directory change; ``torn`` keeps, drops or tears (per
512-byte sector) each pending write and keeps or drops each pending directory operation, with a
seeded random generator. The image directory can then be the backing directory of a fresh mount.
``{"cmd": "ignore_fsync", "value": true}`` turns the disk into one that acknowledges fsync without
doing it (for negative controls).

Known limits: regular files and directories only (no links, no xattrs); rename flags
(RENAME_NOREPLACE/EXCHANGE) are not passed on by mfusepy; with hard_remove an unlinked open file
still reads, writes, truncates and fsyncs, but fstat and fchmod on it fail with ESTALE (the
high-level libfuse API has no path for it and the kernel sends no handle with GETATTR or a mode
SETATTR). SQLite keeps its temporary files outside the database directory, so none of this touches
what the tests run.

Only the standard library and mfusepy are imported: this file runs as a plain script.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import logging
import os
import random
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import mfusepy

SECTOR = 512
ROOT_INO = 1
# libfuse hands UTIME_NOW/UTIME_OMIT through as the nanosecond field with tv_sec 0.
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

log = logging.getLogger("powerfs")


@dataclass(frozen=True)
class Write:
    offset: int
    data: bytes


@dataclass(frozen=True)
class Resize:
    """A truncate or size-extending fallocate: the file becomes exactly `size` bytes long."""

    size: int


FileOp = Write | Resize


@dataclass
class Inode:
    ino: int
    is_dir: bool
    mode: int
    durable: bytearray = field(default_factory=bytearray)
    pending: list[FileOp] = field(default_factory=list)
    live_entries: dict[str, int] = field(default_factory=dict)
    durable_entries: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class EntryChange:
    dir_ino: int
    name: str
    target: int | None  # None removes the entry


@dataclass
class DirOp:
    """One namespace operation (a rename touches two entries): kept or dropped as a whole."""

    kind: str
    changes: list[EntryChange]


@dataclass
class Handle:
    fd: int
    ino: int


@dataclass
class CutStats:
    files: int = 0
    dirs: int = 0
    total_bytes: int = 0
    pending_writes: int = 0
    writes_kept: int = 0
    writes_dropped: int = 0
    writes_torn: int = 0
    sectors_kept: int = 0
    sectors_dropped: int = 0
    resizes_kept: int = 0
    resizes_dropped: int = 0
    pending_dir_ops: int = 0
    dir_ops_kept: int = 0
    dir_ops_dropped: int = 0


def apply_write(buf: bytearray, offset: int, data: bytes) -> None:
    end = offset + len(data)
    if end > len(buf):
        buf.extend(bytes(end - len(buf)))
    buf[offset:end] = data


def apply_resize(buf: bytearray, size: int) -> None:
    if size < len(buf):
        del buf[size:]
    else:
        buf.extend(bytes(size - len(buf)))


def sector_pieces(offset: int, data: bytes) -> Iterable[tuple[int, bytes]]:
    """Split a write at absolute 512-byte boundaries: a disk persists whole sectors or nothing."""
    pos = 0
    while pos < len(data):
        absolute = offset + pos
        step = min(SECTOR - absolute % SECTOR, len(data) - pos)
        yield absolute, data[pos : pos + step]
        pos += step


class PowerModel:
    """The live namespace plus the durable state; all methods are called under one lock."""

    def __init__(self, backing: str) -> None:
        self.backing = backing
        self.inodes: dict[int, Inode] = {}
        self.next_ino = ROOT_INO
        self.dir_ops: list[DirOp] = []
        self.counters: dict[str, int] = {"writes": 0, "fsyncs": 0, "fsyncdirs": 0, "model_errors": 0}
        root = self._new_inode(True, stat.S_IFDIR | 0o755)
        self._load(root, backing)

    # -- set-up ------------------------------------------------------------------------------
    def _new_inode(self, is_dir: bool, mode: int) -> Inode:
        inode = Inode(self.next_ino, is_dir, mode)
        self.inodes[inode.ino] = inode
        self.next_ino += 1
        return inode

    def _load(self, dir_inode: Inode, real_dir: str) -> None:
        """What is on disk at mount time is durable by definition."""
        for entry in sorted(os.scandir(real_dir), key=lambda e: e.name):
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                child = self._new_inode(True, st.st_mode)
                self._load(child, entry.path)
            elif stat.S_ISREG(st.st_mode):
                child = self._new_inode(False, st.st_mode)
                with open(entry.path, "rb") as f:
                    child.durable = bytearray(f.read())
            else:
                raise ValueError(f"powerfs models regular files and directories only: {entry.path}")
            dir_inode.live_entries[entry.name] = child.ino
            dir_inode.durable_entries[entry.name] = child.ino

    # -- lookups -----------------------------------------------------------------------------
    def real(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    def lookup(self, path: str) -> Inode:
        inode = self.inodes[ROOT_INO]
        for part in (p for p in path.split("/") if p):
            if not inode.is_dir or part not in inode.live_entries:
                raise mfusepy.FuseOSError(errno.ENOENT)
            inode = self.inodes[inode.live_entries[part]]
        return inode

    def parent_and_name(self, path: str) -> tuple[Inode, str]:
        head, name = os.path.split(path.rstrip("/"))
        parent = self.lookup(head or "/")
        if not parent.is_dir:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return parent, name

    # -- recording ---------------------------------------------------------------------------
    def record_file_op(self, inode: Inode, op: FileOp) -> None:
        inode.pending.append(op)
        if isinstance(op, Write):
            self.counters["writes"] += 1

    def record_dir_op(self, kind: str, changes: list[EntryChange]) -> None:
        for change in changes:
            entries = self.inodes[change.dir_ino].live_entries
            if change.target is None:
                entries.pop(change.name, None)
            else:
                entries[change.name] = change.target
        self.dir_ops.append(DirOp(kind, changes))

    def make_durable(self, inode: Inode, live_size: int) -> None:
        for op in inode.pending:
            if isinstance(op, Write):
                apply_write(inode.durable, op.offset, op.data)
            else:
                apply_resize(inode.durable, op.size)
        inode.pending.clear()
        self.counters["fsyncs"] += 1
        if len(inode.durable) != live_size:
            # The model missed a change that reached the backing file: the harness is wrong.
            self.counters["model_errors"] += 1
            log.error("model size %d != live size %d for inode %d", len(inode.durable), live_size, inode.ino)

    def make_dir_durable(self, inode: Inode) -> None:
        inode.durable_entries = dict(inode.live_entries)
        for op in self.dir_ops:
            op.changes = [c for c in op.changes if c.dir_ino != inode.ino]
        self.dir_ops = [op for op in self.dir_ops if op.changes]
        self.counters["fsyncdirs"] += 1

    def status(self) -> dict[str, Any]:
        files = [i for i in self.inodes.values() if not i.is_dir]
        return {
            **self.counters,
            "inodes": len(self.inodes),
            "pending_file_ops": sum(len(i.pending) for i in files),
            "pending_dir_ops": len(self.dir_ops),
        }

    # -- the cut -----------------------------------------------------------------------------
    def crash_image(self, mode: str, seed: int, image: str) -> CutStats:
        if mode not in ("clean", "torn"):
            raise ValueError(f"unknown cut mode {mode!r}")
        rng = random.Random(seed)
        stats = CutStats()
        entries = self._crash_entries(mode, rng, stats)
        contents = {
            ino: self._crash_content(inode, mode, rng, stats)
            for ino, inode in sorted(self.inodes.items())
            if not inode.is_dir
        }
        os.makedirs(image, exist_ok=True)
        if os.listdir(image):
            raise ValueError("the image directory must be empty")
        self._write_tree(ROOT_INO, image, entries, contents, stats, set())
        return stats

    def _crash_entries(self, mode: str, rng: random.Random, stats: CutStats) -> dict[int, dict[str, int]]:
        entries = {ino: dict(i.durable_entries) for ino, i in self.inodes.items() if i.is_dir}
        stats.pending_dir_ops = len(self.dir_ops)
        for op in self.dir_ops:
            if mode == "clean" or rng.random() < 0.5:
                stats.dir_ops_dropped += 1
                continue
            stats.dir_ops_kept += 1
            for change in op.changes:
                if change.target is None:
                    entries[change.dir_ino].pop(change.name, None)
                else:
                    entries[change.dir_ino][change.name] = change.target
        return entries

    def _crash_content(self, inode: Inode, mode: str, rng: random.Random, stats: CutStats) -> bytearray:
        data = bytearray(inode.durable)
        stats.pending_writes += sum(isinstance(op, Write) for op in inode.pending)
        if mode == "clean":
            return data
        for op in inode.pending:
            if isinstance(op, Resize):
                if rng.random() < 0.5:
                    stats.resizes_kept += 1
                    apply_resize(data, op.size)
                else:
                    stats.resizes_dropped += 1
                continue
            fate = rng.randrange(3)
            if fate == 0:
                stats.writes_kept += 1
                stats.sectors_kept += sum(1 for _ in sector_pieces(op.offset, op.data))
                apply_write(data, op.offset, op.data)
            elif fate == 1:
                stats.writes_dropped += 1
                stats.sectors_dropped += sum(1 for _ in sector_pieces(op.offset, op.data))
            else:
                stats.writes_torn += 1
                for offset, piece in sector_pieces(op.offset, op.data):
                    if rng.random() < 0.5:
                        stats.sectors_kept += 1
                        apply_write(data, offset, piece)
                    else:
                        stats.sectors_dropped += 1
        return data

    def _write_tree(
        self,
        dir_ino: int,
        real_dir: str,
        entries: dict[int, dict[str, int]],
        contents: dict[int, bytearray],
        stats: CutStats,
        visited: set[int],
    ) -> None:
        # A torn namespace can hold a directory twice (a rename kept in one directory only).
        visited.add(dir_ino)
        for name, ino in sorted(entries[dir_ino].items()):
            inode = self.inodes[ino]
            target = os.path.join(real_dir, name)
            if inode.is_dir:
                if ino in visited:
                    continue
                os.mkdir(target, stat.S_IMODE(inode.mode))
                stats.dirs += 1
                self._write_tree(ino, target, entries, contents, stats, visited)
            else:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IMODE(inode.mode))
                try:
                    os.write(fd, contents[ino])
                    os.fsync(fd)
                finally:
                    os.close(fd)
                stats.files += 1
                stats.total_bytes += len(contents[ino])
        dfd = os.open(real_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


F = TypeVar("F", bound=Callable[..., Any])


def guarded(method: F) -> F:
    """Serialise every operation with the control thread and fail with EIO once frozen."""

    # functools.wraps keeps the signature visible: mfusepy inspects it to decide how to call create.
    @functools.wraps(method)
    def wrapper(self: PowerFs, *args: Any, **kwargs: Any) -> Any:
        with self._mutex:
            if self.frozen:
                if method.__name__ in ("release", "releasedir"):
                    self._close_after_freeze(*args)
                raise mfusepy.FuseOSError(errno.EIO)
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class PowerFs(mfusepy.Operations):
    use_ns = True

    def __init__(self, backing: str) -> None:
        # Not `self.lock`: mfusepy would take that for the FUSE lock operation.
        self._mutex = threading.Lock()
        self.frozen = False
        # A disk that acknowledges flushes without doing them: the negative control for the proofs.
        self.ignore_fsync = False
        self.model = PowerModel(backing)
        self.handles: dict[int, Handle] = {}
        self.next_fh = 1
        self.mounted = threading.Event()

    # -- helpers -----------------------------------------------------------------------------
    def _inode_for(self, path: str | None, fh: int | None) -> Inode:
        if fh is not None and fh in self.handles:
            return self.model.inodes[self.handles[fh].ino]
        if path is None:
            raise mfusepy.FuseOSError(errno.EBADF)
        return self.model.lookup(path)

    def _open_handle(self, fd: int, ino: int) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = Handle(fd, ino)
        return fh

    def _fd(self, fh: int) -> int:
        try:
            return self.handles[fh].fd
        except KeyError:
            raise mfusepy.FuseOSError(errno.EBADF) from None

    def _close_after_freeze(self, path: str | None, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is not None:
            os.close(handle.fd)

    @staticmethod
    def _backing_flags(flags: int) -> int:
        # The kernel resolves O_APPEND offsets itself; Linux pwrite on an O_APPEND fd would ignore
        # the offset the kernel sends.
        return flags & ~(os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOCTTY)

    # -- lifecycle ---------------------------------------------------------------------------
    def init_with_config(self, conn_info: Any, config_3: Any) -> None:
        if config_3 is not None:
            # No kernel caching of names or attributes, no page cache kept across opens: every
            # operation reaches the model. direct_io stays off because SQLite mmaps its -shm file.
            config_3.entry_timeout = 0.0
            config_3.negative_timeout = 0.0
            config_3.attr_timeout = 0.0
            config_3.hard_remove = 1
            config_3.direct_io = 0
            config_3.kernel_cache = 0
            config_3.auto_cache = 0
        self.mounted.set()

    # -- metadata ----------------------------------------------------------------------------
    @guarded
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        if fh is not None and fh in self.handles:
            st = os.fstat(self.handles[fh].fd)
        else:
            if path is None:
                raise mfusepy.FuseOSError(errno.EBADF)
            self.model.lookup(path)
            st = os.lstat(self.model.real(path))
        keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_blksize")
        attrs: dict[str, Any] = {key: getattr(st, key) for key in keys}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    @guarded
    def readdir(self, path: str, fh: int) -> list[str]:
        inode = self.model.lookup(path)
        if not inode.is_dir:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return [".", "..", *sorted(inode.live_entries)]

    @guarded
    def opendir(self, path: str) -> int:
        if not self.model.lookup(path).is_dir:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return 0

    @guarded
    def releasedir(self, path: str | None, fh: int) -> int:
        return 0

    @guarded
    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self.model.backing)
        keys = (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_flag",
            "f_namemax",
        )
        return {key: getattr(sv, key) for key in keys}

    @guarded
    def chmod(self, path: str | None, mode: int) -> int:
        if path is None:
            raise mfusepy.FuseOSError(errno.EBADF)
        inode = self.model.lookup(path)
        os.chmod(self.model.real(path), stat.S_IMODE(mode))
        inode.mode = stat.S_IFMT(inode.mode) | stat.S_IMODE(mode)
        return 0

    @guarded
    def chown(self, path: str | None, uid: int, gid: int) -> int:
        if path is None:
            raise mfusepy.FuseOSError(errno.EBADF)
        self.model.lookup(path)
        os.lchown(self.model.real(path), uid, gid)
        return 0

    @guarded
    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        if path is None:
            raise mfusepy.FuseOSError(errno.EBADF)
        self.model.lookup(path)
        real = self.model.real(path)
        if times is None:
            os.utime(real)
            return 0
        st = os.lstat(real)
        now = None
        resolved = []
        for value, current in zip(times, (st.st_atime_ns, st.st_mtime_ns)):
            if value == UTIME_OMIT:
                resolved.append(current)
            elif value == UTIME_NOW:
                now = now or time.time_ns()
                resolved.append(now)
            else:
                resolved.append(value)
        os.utime(real, ns=(resolved[0], resolved[1]))
        return 0

    # -- namespace ---------------------------------------------------------------------------
    @guarded
    def create(self, path: str, mode: int, flags: int) -> int:
        parent, name = self.model.parent_and_name(path)
        if name in parent.live_entries:
            raise mfusepy.FuseOSError(errno.EEXIST)
        fd = os.open(self.model.real(path), self._backing_flags(flags) | os.O_CREAT | os.O_EXCL, mode)
        inode = self.model._new_inode(False, stat.S_IFREG | stat.S_IMODE(os.fstat(fd).st_mode))
        self.model.record_dir_op("create", [EntryChange(parent.ino, name, inode.ino)])
        return self._open_handle(fd, inode.ino)

    @guarded
    def mkdir(self, path: str, mode: int) -> int:
        parent, name = self.model.parent_and_name(path)
        if name in parent.live_entries:
            raise mfusepy.FuseOSError(errno.EEXIST)
        os.mkdir(self.model.real(path), mode)
        inode = self.model._new_inode(True, os.lstat(self.model.real(path)).st_mode)
        self.model.record_dir_op("mkdir", [EntryChange(parent.ino, name, inode.ino)])
        return 0

    @guarded
    def unlink(self, path: str) -> int:
        parent, name = self.model.parent_and_name(path)
        if name not in parent.live_entries:
            raise mfusepy.FuseOSError(errno.ENOENT)
        os.unlink(self.model.real(path))
        self.model.record_dir_op("unlink", [EntryChange(parent.ino, name, None)])
        return 0

    @guarded
    def rmdir(self, path: str) -> int:
        parent, name = self.model.parent_and_name(path)
        if name not in parent.live_entries:
            raise mfusepy.FuseOSError(errno.ENOENT)
        os.rmdir(self.model.real(path))
        self.model.record_dir_op("rmdir", [EntryChange(parent.ino, name, None)])
        return 0

    @guarded
    def rename(self, old: str, new: str) -> int:
        old_parent, old_name = self.model.parent_and_name(old)
        new_parent, new_name = self.model.parent_and_name(new)
        if old_name not in old_parent.live_entries:
            raise mfusepy.FuseOSError(errno.ENOENT)
        ino = old_parent.live_entries[old_name]
        os.rename(self.model.real(old), self.model.real(new))
        changes = [EntryChange(old_parent.ino, old_name, None), EntryChange(new_parent.ino, new_name, ino)]
        self.model.record_dir_op("rename", changes)
        return 0

    @guarded
    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        if path is None:
            raise mfusepy.FuseOSError(errno.EBADF)
        inode = self.model.lookup(path)
        if not inode.is_dir:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        if not self.ignore_fsync:
            self.model.make_dir_durable(inode)
        return 0

    # -- file data ---------------------------------------------------------------------------
    @guarded
    def open(self, path: str, flags: int) -> int:
        inode = self.model.lookup(path)
        if inode.is_dir:
            raise mfusepy.FuseOSError(errno.EISDIR)
        fd = os.open(self.model.real(path), self._backing_flags(flags))
        if flags & os.O_TRUNC:
            self.model.record_file_op(inode, Resize(0))
        return self._open_handle(fd, inode.ino)

    @guarded
    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return os.pread(self._fd(fh), size, offset)

    @guarded
    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        written = os.pwrite(self._fd(fh), data, offset)
        self.model.record_file_op(self.model.inodes[self.handles[fh].ino], Write(offset, data[:written]))
        return written

    @guarded
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        inode = self._inode_for(path, fh)
        if fh is not None and fh in self.handles:
            os.ftruncate(self.handles[fh].fd, length)
        else:
            assert path is not None
            os.truncate(self.model.real(path), length)
        self.model.record_file_op(inode, Resize(length))
        return 0

    @guarded
    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> int:
        if mode != 0:
            # Hole punching and KEEP_SIZE are not modelled; callers fall back to plain writes.
            raise mfusepy.FuseOSError(errno.EOPNOTSUPP)
        fd = self._fd(fh)
        before = os.fstat(fd).st_size
        os.posix_fallocate(fd, offset, size)
        after = os.fstat(fd).st_size
        if after != before:
            self.model.record_file_op(self.model.inodes[self.handles[fh].ino], Resize(after))
        return 0

    @guarded
    def flush(self, path: str | None, fh: int) -> int:
        return 0

    @guarded
    def release(self, path: str | None, fh: int) -> int:
        handle = self.handles.pop(fh, None)
        if handle is not None:
            os.close(handle.fd)
        return 0

    @guarded
    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        fd = self._fd(fh)
        if not self.ignore_fsync:
            self.model.make_durable(self.model.inodes[self.handles[fh].ino], os.fstat(fd).st_size)
        return 0

    # -- control -----------------------------------------------------------------------------
    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        with self._mutex:
            if cmd == "ping":
                return {"ok": True, "pong": True, "mounted": self.mounted.is_set()}
            if cmd == "status":
                return {
                    "ok": True,
                    "frozen": self.frozen,
                    "ignore_fsync": self.ignore_fsync,
                    "mounted": self.mounted.is_set(),
                    "open_handles": len(self.handles),
                    **self.model.status(),
                }
            if cmd == "ignore_fsync":
                self.ignore_fsync = bool(request["value"])
                return {"ok": True, "ignore_fsync": self.ignore_fsync}
            if cmd == "cut":
                if self.frozen:
                    return {"ok": False, "error": "already cut"}
                self.frozen = True
                stats = self.model.crash_image(str(request["mode"]), int(request["seed"]), str(request["image"]))
                return {"ok": True, **stats.__dict__, "model_errors": self.model.counters["model_errors"]}
        return {"ok": False, "error": f"unknown command {cmd!r}"}


class PowerFuse(mfusepy.FUSE):
    """mfusepy's libfuse3 truncate drops the file handle; an unlinked open file has no path
    (hard_remove), so ftruncate on it would fail without the handle."""

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        fh = fip.contents.fh if fip else None
        return self.operations.truncate(self._decode(path), length, fh)

    def _decode(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)


def serve_control(fs: PowerFs, sock_path: str) -> None:
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(8)

    def handle(conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            for line in stream:
                try:
                    answer = fs.control(json.loads(line))
                except Exception as exc:  # the client gets the reason instead of a dead socket
                    log.exception("control command failed")
                    answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                stream.write(json.dumps(answer).encode() + b"\n")
                stream.flush()

    def accept_loop() -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True, name="control").start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backing", required=True)
    parser.add_argument("--mount", required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--debug", action="store_true", help="libfuse request trace on stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="powerfs: %(levelname)s %(message)s")
    fs = PowerFs(os.path.abspath(args.backing))
    serve_control(fs, args.control)
    PowerFuse(
        fs,
        args.mount,
        foreground=True,
        nothreads=True,
        debug=args.debug,
        fsname="powerfs",
        subtype="powerfs",
        default_permissions=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
