"""`modelherd verify` / `pull` as a user runs them, on hostile folders: exit 5 with a Problem line, promptly,
never a traceback, a hang, or a line that a file name forged."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from tests.hubserver import HubServer
from tests.integration.test_cli import pull_hf, run_cli
from tests.modelgen import make_sharded_model

# A hostile folder must be reported in about the time a healthy one is; a hang is a failure, not a wait.
PROMPT_S = 60

SHARD = "model-00001-of-00001.safetensors"


def _header(doc: bytes) -> bytes:
    return struct.pack("<Q", len(doc)) + doc


HOSTILE_FILES: dict[str, tuple[str, bytes]] = {
    "deeply nested safetensors header": (SHARD, _header(b"[" * 100_000 + b"]" * 100_000)),
    "absurd shape in a safetensors header": (
        SHARD, _header(json.dumps({"t": {"dtype": "U8", "shape": [9 ** 4000], "data_offsets": [0, 1]}},
                                  ).encode()) + b"\0"),
    "integer beyond the digit limit in the index": ("model.safetensors.index.json",
                                                    b'{"weight_map": {"t": ' + b"1" * 5000 + b"}}"),
    "deeply nested model_index.json": ("model_index.json", b"[" * 100_000 + b"]" * 100_000),
    "manifest with an infinite size": (".modelherd-manifest.json", json.dumps({
        "source_uri": "local:///x", "revision": "r", "writer": "w", "completed_at": "c",
        "files": [{"path": "config.json", "size": float("inf")}]}).encode()),
}


def assert_reported(r: subprocess.CompletedProcess[str], name: str) -> None:
    assert r.returncode == 5, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "unexpected error" not in r.stderr, r.stderr
    assert any(line.startswith(f"{name}: ") for line in r.stdout.splitlines()), r.stdout


@pytest.mark.parametrize(("name", "data"), HOSTILE_FILES.values(), ids=HOSTILE_FILES.keys())
def test_verify_reports_hostile_json_with_exit_5(tmp_path: Path, name: str, data: bytes) -> None:
    make_sharded_model(tmp_path, 1, 1024)
    (tmp_path / name).write_bytes(data)
    assert_reported(run_cli("verify", str(tmp_path), timeout=PROMPT_S), name)


@pytest.mark.parametrize("command", ["verify", "pull"])
def test_fifo_named_model_safetensors_does_not_hang_verify_or_pull_local(tmp_path: Path, command: str) -> None:
    model = tmp_path / "m"
    make_sharded_model(model, 1, 1024)
    (model / SHARD).unlink()
    os.mkfifo(model / SHARD)
    args = ["verify", str(model)] if command == "verify" else ["pull", f"local://{model}", "--models-root",
                                                                str(tmp_path / "root"), "--no-progress"]
    r = run_cli(*args, timeout=PROMPT_S)  # today: blocks in open() forever (TimeoutExpired here)
    assert_reported(r, SHARD)
    assert "named pipe (FIFO)" in r.stdout


def test_a_file_name_cannot_forge_a_verify_line(tmp_path: Path) -> None:
    model = tmp_path / "m"
    make_sharded_model(model, 1, 1024, with_index=False)
    forged = "evil\nm: OK\n\x1b[2K.safetensors"  # the line `modelherd verify m` prints for a whole model
    (model / forged).write_bytes(b"not safetensors")
    r = run_cli("verify", "m", timeout=PROMPT_S, cwd=tmp_path)
    assert r.returncode == 5
    lines = r.stdout.splitlines()
    assert "m: OK" not in lines and "\x1b" not in r.stdout
    assert len(lines) == 1 and lines[0].startswith("'evil\\nm: OK\\n\\x1b[2K.safetensors': "), lines


def test_pull_over_a_hostile_manifest_downloads_again_instead_of_crashing(hub_server: HubServer,
                                                                          tmp_path: Path) -> None:
    """The restart fast path reads the manifest first: a hostile one used to crash every restart."""
    src = tmp_path / "src"
    make_sharded_model(src, 1, 4096)
    hub_server.add_repo("acme/tiny", src)
    root = tmp_path / "models"
    dest = root / "acme/tiny"
    dest.mkdir(parents=True)
    (dest / ".modelherd-manifest.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    r = pull_hf(hub_server, "acme/tiny", root)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["how"] == "pulled"
    assert run_cli("verify", str(dest), "--deep").returncode == 0
