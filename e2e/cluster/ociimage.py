"""Write a container image as an OCI image-layout tar without a container engine (e2e/cluster/README.md, "Images").

    python3 ociimage.py layer ROOTFS_DIR OUT.tar           # one layer: an uncompressed PAX tar of ROOTFS_DIR
    python3 ociimage.py image NAME:TAG OUT.tar LAYER.tar... [--entrypoint JSON] [--cmd JSON] [--env K=V]...

Invariants: a layer tar holds paths relative to its rootfs, walked in sorted order, owned by root with mtime 0,
so the same folder always gives the same bytes (and digest); ``image`` writes each blob once with mtime 0 and an
``index.json`` whose ``io.containerd.image.name`` annotation names the image for ``ctr images import``.
Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def write_layer(rootfs: Path, out: Path) -> None:
    """Tar ``rootfs`` into ``out`` (atomic rename), deterministic: sorted walk, uid/gid 0, mtime 0."""
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(rootfs):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, rootfs)
            names = sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))])
            if rel_dir != ".":
                tar.add(dirpath, arcname=rel_dir, recursive=False, filter=_norm)
            for name in names:
                full = os.path.join(dirpath, name)
                arc = name if rel_dir == "." else os.path.join(rel_dir, name)
                st = os.lstat(full)
                if not (os.path.isfile(full) or os.path.islink(full)) or _is_special(st.st_mode):
                    continue  # sockets, fifos, devices: not wanted in an image
                tar.add(full, arcname=arc, recursive=False, filter=_norm)
    os.replace(tmp, out)


def _is_special(mode: int) -> bool:
    import stat
    return stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


def _norm(ti: tarfile.TarInfo) -> tarfile.TarInfo:
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.mtime = 0
    return ti


def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _full_name(name: str) -> str:
    return name if "/" in name.split(":", 1)[0] else f"docker.io/library/{name}"


def write_image(name: str, out: Path, layers: list[Path], *, entrypoint: list[str] | None,
                cmd: list[str] | None, env: list[str], workdir: str) -> None:
    """The image ``name`` made of ``layers`` (bottom first) as an OCI layout tar at ``out`` (atomic rename)."""
    digests = [_sha256_file(p) for p in layers]
    cfg: dict[str, object] = {"Env": [PATH_ENV, *env], "WorkingDir": workdir}
    if entrypoint:
        cfg["Entrypoint"] = entrypoint
    if cmd:
        cfg["Cmd"] = cmd
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": cfg, "rootfs": {"type": "layers", "diff_ids": [f"sha256:{d}" for d in digests]},
        "history": [{"created_by": "e2e/cluster/ociimage.py"} for _ in layers]}, sort_keys=True).encode()
    cdig = hashlib.sha256(config).hexdigest()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": f"sha256:{cdig}",
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": f"sha256:{d}",
                    "size": p.stat().st_size} for d, p in zip(digests, layers, strict=True)]},
        sort_keys=True).encode()
    mdig = hashlib.sha256(manifest).hexdigest()
    tag = name.rsplit(":", 1)[1] if ":" in name.split("/")[-1] else "latest"
    index = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": f"sha256:{mdig}",
                       "size": len(manifest), "platform": {"architecture": "amd64", "os": "linux"},
                       "annotations": {"io.containerd.image.name": _full_name(name),
                                       "org.opencontainers.image.ref.name": tag}}]}, sort_keys=True).encode()
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        def add_bytes(arc: str, data: bytes) -> None:
            ti = tarfile.TarInfo(arc)
            ti.size, ti.mtime = len(data), 0
            tar.addfile(ti, io.BytesIO(data))
        add_bytes("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        seen: set[str] = set()
        for d, p in zip(digests, layers, strict=True):
            if d in seen:
                continue
            seen.add(d)
            ti = tarfile.TarInfo(f"blobs/sha256/{d}")
            ti.size, ti.mtime = p.stat().st_size, 0
            with p.open("rb") as f:
                tar.addfile(ti, f)
        add_bytes(f"blobs/sha256/{cdig}", config)
        add_bytes(f"blobs/sha256/{mdig}", manifest)
        add_bytes("index.json", index)
    os.replace(tmp, out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd_name", required=True)
    lp = sub.add_parser("layer")
    lp.add_argument("rootfs", type=Path)
    lp.add_argument("out", type=Path)
    ip = sub.add_parser("image")
    ip.add_argument("name")
    ip.add_argument("out", type=Path)
    ip.add_argument("layers", type=Path, nargs="+")
    ip.add_argument("--entrypoint", type=json.loads, default=None)
    ip.add_argument("--cmd", type=json.loads, default=None)
    ip.add_argument("--env", action="append", default=[])
    ip.add_argument("--workdir", default="/")
    a = ap.parse_args()
    if a.cmd_name == "layer":
        write_layer(a.rootfs, a.out)
    else:
        write_image(a.name, a.out, a.layers, entrypoint=a.entrypoint, cmd=a.cmd, env=a.env, workdir=a.workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
