"""Filesystem detection: pure over mountinfo text + a statfs magic, and the real calls on this machine."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest
from modelherd.storage.errors import ConfigError
from modelherd.storage.fsdetect import (
    FsInfo,
    classify,
    detect_filesystem,
    parse_mountinfo,
    resolve_storage_mode,
    statfs_magic,
)

# A node with a local root, an NFS models root, a JuiceFS and an unknown FUSE mount, a Weka mount, and an
# overlay mounted *over* the NFS mount point later (shadowing it).
MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
40 27 0:50 / /mnt/models rw,relatime shared:7 - nfs4 fs.example:/export/models rw,vers=4.1
41 27 0:51 / /mnt/jfs rw,relatime - fuse.juicefs JuiceFS:vol rw,user_id=0
42 27 0:52 / /mnt/odd rw,relatime - fuse.mystery mystery rw
43 27 0:53 / /mnt/weka rw,relatime - wekafs default rw
44 27 0:54 / /mnt/with\\040space rw,relatime - lustre 10.0.0.1@tcp:/fs rw
45 27 0:55 / /mnt/shadow rw - nfs srv:/a rw
46 27 0:56 / /mnt/shadow rw - ext4 /dev/vdb rw
47 27 0:57 / /mnt/s3 rw - fuse s3fs rw
48 27 0:58 / /mnt/vm rw - 9p hostshare rw
"""


def _at(path: str, magic: int | None = None) -> FsInfo:
    return classify(path, MOUNTINFO, magic)


@pytest.mark.parametrize(("path", "kind", "fstype", "mountpoint"), [
    ("/mnt/models/llama", "shared", "nfs4", "/mnt/models"),
    ("/mnt/modelsX/llama", "local", "ext4", "/"),  # prefix of a name is not a path prefix
    ("/mnt/jfs/a", "shared", "fuse.juicefs", "/mnt/jfs"),
    ("/mnt/odd/a", "local", "fuse.mystery", "/mnt/odd"),
    ("/mnt/weka", "shared", "wekafs", "/mnt/weka"),
    ("/mnt/with space/m", "shared", "lustre", "/mnt/with space"),
    ("/mnt/shadow/m", "local", "ext4", "/mnt/shadow"),  # the later mount shadows the NFS one
    ("/mnt/s3/m", "shared", "fuse.s3fs", "/mnt/s3"),
    ("/mnt/vm/m", "local", "9p", "/mnt/vm"),
    ("/var/lib", "local", "ext4", "/"),
])
def test_mountinfo_decides_by_longest_prefix(path: str, kind: str, fstype: str, mountpoint: str) -> None:
    info = _at(path)
    assert (info.kind, info.fstype, info.mountpoint) == (kind, fstype, mountpoint)


@pytest.mark.parametrize(("magic", "kind", "name"), [
    (0x6969, "shared", "nfs"), (0x47504653, "shared", "gpfs"), (0x0BD00BD0, "shared", "lustre"),
    (0x00C36400, "shared", "ceph"), (0x19830326, "shared", "beegfs"), (0xFF534D42, "shared", "cifs"),
    (0xFE534D42, "shared", "smb2"), (0xEF53, "local", "ext4"), (0x58465342, "local", "xfs"),
    (0x01021994, "local", "tmpfs"), (0x12345678, "local", "unknown"),
])
def test_statfs_magic_decides_without_mountinfo(magic: int, kind: str, name: str) -> None:
    info = detect_filesystem("/", mountinfo="", statfs=lambda _: magic)
    assert (info.kind, info.fstype, info.magic) == (kind, name, magic)
    assert f"{magic:#x}" in info.evidence


def test_shared_magic_wins_over_an_unknown_mountinfo_name() -> None:
    text = "27 1 254:0 / / rw - exoticfs dev rw\n"
    info = detect_filesystem("/", mountinfo=text, statfs=lambda _: 0x6969)
    assert info.kind == "shared" and "nfs" in info.evidence


def test_nothing_readable_is_local_and_says_why() -> None:
    info = detect_filesystem("/", mountinfo="", statfs=None)
    assert info.kind == "local" and "could be read" in info.evidence


def test_malformed_mountinfo_lines_are_skipped() -> None:
    mounts = parse_mountinfo("garbage\n1 2 3\n27 1 254:0 / / rw - ext4 /dev/vda rw\n")
    assert [(m.mountpoint, m.fstype) for m in mounts] == [("/", "ext4")]


def test_missing_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        detect_filesystem(tmp_path / "nope")
    assert ei.value.hint


def test_symlink_is_resolved_before_matching(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("/proc")
    info = detect_filesystem(tmp_path / "link")
    assert info.fstype == "proc" and info.mountpoint == "/proc"


# ---- the real calls on this machine ----------------------------------------------------------------------

def _stat_f_type(path: str) -> int:
    out = subprocess.run(["stat", "-f", "-c", "%t", path], check=True, capture_output=True, text=True).stdout
    return int(out.strip(), 16)


@pytest.mark.skipif(shutil.which("stat") is None, reason="coreutils stat missing")
@pytest.mark.parametrize("path", ["/", "/tmp", "/proc", "/dev/shm"])
def test_real_statfs_matches_coreutils(path: str) -> None:
    if not Path(path).exists():
        pytest.skip(f"{path} missing")
    assert statfs_magic(path) == _stat_f_type(path)


@pytest.mark.parametrize(("path", "fstype"), [("/proc", "proc"), ("/dev/shm", "tmpfs")])
def test_real_detection_on_this_machine(path: str, fstype: str) -> None:
    if not Path(path).exists():
        pytest.skip(f"{path} missing")
    info = detect_filesystem(path)
    assert info.kind == "local" and info.fstype == fstype and info.mountpoint == path
    assert info.magic == _stat_f_type(path)


@pytest.mark.parametrize("path", ["/", "/tmp"])
def test_real_root_and_tmp_agree_with_proc_mounts(path: str) -> None:
    info = detect_filesystem(path)
    assert info.mountpoint and info.fstype != "unknown"
    assert info.magic == _stat_f_type(path)
    assert path in info.evidence


def test_statfs_on_missing_path_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        statfs_magic(str(tmp_path / "nope"))


# ---- override ------------------------------------------------------------------------------------------

def test_override_wins_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    info = detect_filesystem("/", mountinfo="", statfs=lambda _: 0x6969)
    with caplog.at_level(logging.INFO, logger="modelherd.storage.fsdetect"):
        assert resolve_storage_mode("local", info) == "local"
        assert resolve_storage_mode("auto", info) == "shared"
        assert resolve_storage_mode("shared", info) == "shared"
    msgs = [r.getMessage() for r in caplog.records]
    assert "overriding detection" in msgs[0] and "nfs" in msgs[0]
    assert "(auto)" in msgs[1]
    assert "agrees" in msgs[2]


def test_unknown_mode_is_a_config_error() -> None:
    info = detect_filesystem("/", mountinfo="", statfs=None)
    with pytest.raises(ConfigError):
        resolve_storage_mode("both", info)  # type: ignore[arg-type]


# The mountinfo lines real clients write (fstype "fuse.<subtype>", their usual source), e.g. the sshfs mount
# of e2e/cluster: "fuse.sshfs root@10.202.1.1:/export".
@pytest.mark.parametrize(("fstype", "source"), [
    ("fuse.sshfs", "root@10.202.1.1:/srv/models"),
    ("fuse.mfs", "mfsmaster:9421"),            # MooseFS (and LizardFS, which keeps the mfs name)
    ("fuse.lizardfs", "mfsmaster:9421"),
    ("fuse.seaweedfs", "filer:8888:/models"),
    ("fuse.hf3fs", "hf3fs"),                   # DeepSeek 3FS
    ("fuse.objectivefs", "s3://bucket"),
    ("fuse.geesefs", "bucket"),
    ("fuse.xtreemfs", "dir.example/vol"),
    ("fuse.juicefs", "JuiceFS:vol"),
    ("fuse.s3fs", "s3fs"),
    ("fuse.gcsfuse", "bucket"),
    ("fuse.ceph-fuse", "ceph-fuse"),
    ("fuse.glusterfs", "gl1:/vol"),
    ("fuse.weka", "weka"),
])
def test_network_fuse_subtypes_are_shared(fstype: str, source: str) -> None:
    text = f"27 1 254:0 / / rw - ext4 /dev/vda rw\n50 27 0:60 / /mnt/models rw - {fstype} {source} rw\n"
    info = classify("/mnt/models/m", text, 0x65735546)
    assert (info.kind, info.fstype) == ("shared", fstype), info.evidence
