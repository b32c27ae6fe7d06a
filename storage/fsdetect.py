"""Which filesystem holds a path, and is it shared between nodes?

Shared means every node that mounts it sees the same bytes, so one download serves them all (coordinate
with a Lease); local means each node downloads its own copy.

Evidence, strongest first:
1. ``/proc/self/mountinfo``: the mount whose mountpoint is the longest prefix of the path's realpath
   (the last such line wins, as later mounts shadow earlier ones). Its fstype name decides, including FUSE
   subtypes (``fuse.juicefs``) and names ``statfs`` cannot tell apart (``wekafs``).
2. ``statfs(2)`` ``f_type`` magic, read through ``ctypes``: decides when mountinfo is unreadable or names an
   fstype we do not know.

Decisions (documented, tested):
- shared names: nfs, nfs4, lustre, gpfs, ceph, beegfs, cifs, smb3, smbfs, wekafs, gfs2, ocfs2, orangefs,
  pvfs2, glusterfs, afs, panfs; FUSE subtypes glusterfs, juicefs, ceph-fuse, gcsfuse, s3fs, goofys, rclone,
  blobfuse, blobfuse2, mountpoint-s3, sshfs, alluxio-fuse, lustre, weka, quobyte, mfs (MooseFS, LizardFS), lizardfs,
  seaweedfs, hf3fs (3FS), objectivefs, geesefs, xtreemfs (``cvmfs2`` is left out:
  a read-only software distribution, not a place to write models);
- ``9p`` and ``virtiofs`` are **local**: they share a host folder into one VM, not between Kubernetes nodes;
- an unknown FUSE subtype is **local**, with evidence saying so: a wrong "shared" would make nodes wait on
  each other for a copy they can't see, a wrong "local" only costs a duplicate download;
- everything else (ext4, xfs, btrfs, zfs, overlay, tmpfs, ...) is local.
``resolve_storage_mode`` lets the operator override any of this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .errors import ConfigError

log = logging.getLogger("modelherd.storage.fsdetect")

Kind = Literal["shared", "local"]
MOUNTINFO = "/proc/self/mountinfo"

# statfs f_type magics of network/cluster filesystems (linux/magic.h and the vendors' sources).
SHARED_MAGIC: dict[int, str] = {
    0x6969: "nfs",
    0x47504653: "gpfs",
    0x0BD00BD0: "lustre",
    0x00C36400: "ceph",
    0x19830326: "beegfs",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x01161970: "gfs2",
    0x7461636F: "ocfs2",
    0x20030528: "orangefs",
    0x5346414F: "afs",
}
LOCAL_MAGIC: dict[int, str] = {
    0xEF53: "ext4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x2FC12FC1: "zfs",
    0x794C7630: "overlay",
    0x01021994: "tmpfs",
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x1373: "devtmpfs",
    0x01021997: "9p",
    0x6A656A63: "virtiofs",
    0x65735546: "fuse",
}
SHARED_FSTYPES = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "ceph", "beegfs", "cifs", "smb3", "smbfs", "wekafs", "gfs2", "ocfs2",
    "orangefs", "pvfs2", "glusterfs", "afs", "panfs",
})
SHARED_FUSE_SUBTYPES = frozenset({
    "glusterfs", "juicefs", "ceph-fuse", "ceph", "gcsfuse", "s3fs", "goofys", "rclone", "blobfuse", "blobfuse2",
    "mountpoint-s3", "sshfs", "alluxio-fuse", "lustre", "weka", "quobyte",
    "mfs", "lizardfs", "seaweedfs", "hf3fs", "objectivefs", "geesefs", "xtreemfs",
})


@dataclass(frozen=True)
class FsInfo:
    """What holds a path. ``evidence`` is one human sentence for the log."""

    kind: Kind
    fstype: str
    magic: int | None
    mountpoint: str
    source: str
    evidence: str


@dataclass(frozen=True)
class Mount:
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """Mounts from ``/proc/<pid>/mountinfo`` text, in file order; malformed lines are skipped."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        mounts.append(Mount(mountpoint=_unescape(fields[4]), fstype=tail[0], source=_unescape(tail[1])))
    return mounts


def find_mount(mounts: list[Mount], realpath: str) -> Mount | None:
    """The mount holding ``realpath``: longest mountpoint that is a path prefix; the last one on ties."""
    best: Mount | None = None
    for m in mounts:
        mp = m.mountpoint.rstrip("/") or "/"
        if (mp == "/" or realpath == mp or realpath.startswith(mp + "/")) and (
                best is None or len(mp) >= len(best.mountpoint.rstrip("/") or "/")):
            best = m
    return best


def statfs_magic(path: str) -> int:
    """``statfs(2)`` ``f_type`` of ``path``. ``f_type`` is the first field of ``struct statfs`` on Linux
    (a ``long`` on x86_64 and aarch64, a 32-bit word on 32-bit ABIs), so only it is read."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    buf = ctypes.create_string_buffer(256)  # sizeof(struct statfs) is 120 on 64-bit Linux
    if libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    value = ctypes.c_ulong.from_buffer(buf).value
    return value & 0xFFFFFFFF  # magics are 32-bit; drop sign extension of a negative long


def _classify(mount: Mount | None, magic: int | None) -> tuple[Kind, str, str]:
    """(kind, fstype name, reason)."""
    if mount is not None:
        name = mount.fstype
        base, _, subtype = name.partition(".")
        if base in ("fuse", "fuseblk") and subtype:
            if subtype in SHARED_FUSE_SUBTYPES:
                return "shared", name, f"FUSE subtype {subtype!r} is a network filesystem"
            return "local", name, (f"FUSE subtype {subtype!r} is not known to be shared; "
                                   "set storage mode 'shared' if every node sees the same files")
        if base in ("fuse", "fuseblk") and mount.source in SHARED_FUSE_SUBTYPES:
            return "shared", f"fuse.{mount.source}", f"FUSE source {mount.source!r} is a network filesystem"
        if name in SHARED_FSTYPES:
            return "shared", name, f"fstype {name!r} is a network/cluster filesystem"
        if magic is not None and magic in SHARED_MAGIC:
            return "shared", name, f"statfs magic {magic:#x} is {SHARED_MAGIC[magic]}"
        return "local", name, f"fstype {name!r} is node-local"
    if magic is not None and magic in SHARED_MAGIC:
        return "shared", SHARED_MAGIC[magic], f"statfs magic {magic:#x} is {SHARED_MAGIC[magic]}"
    name = LOCAL_MAGIC.get(magic, "unknown") if magic is not None else "unknown"
    return "local", name, f"statfs magic {magic:#x} is not a known shared filesystem" if magic is not None \
        else "neither mountinfo nor statfs could be read"


def detect_filesystem(path: str | os.PathLike[str], *, mountinfo: str | None = None,
                      statfs: Callable[[str], int] | None = statfs_magic) -> FsInfo:
    """Classify the filesystem holding ``path`` (which must exist).

    ``mountinfo`` (text) and ``statfs`` (path -> magic; ``None`` to skip) are injectable for tests; by
    default the real ``/proc/self/mountinfo`` and ``statfs(2)`` are used. Pure over those two inputs.
    """
    real = os.path.realpath(path)
    if not os.path.exists(real):
        raise ConfigError(f"cannot detect the filesystem of {path}: it does not exist",
                          hint="create the models root first, or fix --models-root-dir")
    if mountinfo is None:
        try:
            with open(MOUNTINFO) as f:
                mountinfo = f.read()
        except OSError:
            mountinfo = ""
    magic: int | None = None
    if statfs is not None:
        try:
            magic = statfs(real)
        except OSError as e:
            log.debug("statfs(%s) failed: %s", real, e)
    return classify(real, mountinfo, magic)


def classify(realpath: str, mountinfo: str, magic: int | None) -> FsInfo:
    """Pure: classify ``realpath`` given mountinfo text and a statfs magic (``None``: unknown)."""
    mount = find_mount(parse_mountinfo(mountinfo), realpath)
    kind, fstype, reason = _classify(mount, magic)
    mp = mount.mountpoint if mount else ""
    where = f"{realpath} is on {mp or '?'} ({fstype}" + (f", source {mount.source}" if mount else "") + \
        (f", magic {magic:#x})" if magic is not None else ")")
    return FsInfo(kind=kind, fstype=fstype, magic=magic, mountpoint=mp, source=mount.source if mount else "",
                  evidence=f"{where}: {kind} because {reason}")


def resolve_storage_mode(mode: Literal["auto", "shared", "local"], info: FsInfo) -> Kind:
    """The storage mode to use: an explicit ``shared``/``local`` wins over detection; ``auto`` follows it.

    Logs the decision with its evidence (logger ``modelherd.storage.fsdetect``).
    """
    if mode == "auto":
        log.info("storage mode %s (auto): %s", info.kind, info.evidence)
        return info.kind
    if mode not in ("shared", "local"):
        raise ConfigError(f"unknown storage mode {mode!r}", hint="use auto, shared or local")
    if mode != info.kind:
        log.warning("storage mode %s (set by the operator, overriding detection): %s", mode, info.evidence)
    else:
        log.info("storage mode %s (set by the operator, agrees with detection): %s", mode, info.evidence)
    return mode
