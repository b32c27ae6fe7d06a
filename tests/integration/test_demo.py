"""`modelherd demo` as a user runs it: real processes, a loopback Hub, and no network at all.

Every Python process of the demo (the demo and its node processes) runs with an audit hook (a ``sitecustomize``
on ``PYTHONPATH``) that records each ``socket.connect`` and ``socket.getaddrinfo``; where the kernel allows it, the
demo also runs in a fresh network namespace that has only a loopback interface, so a stray request cannot
leave the machine even by accident.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from modelherd.agent.demo import child_env

REPO = Path(__file__).resolve().parents[2]
MODELHERD = str(Path(sys.executable).with_name("modelherd"))

AUDIT_HOOK = '''
import os, sys
_dir = os.environ.get("DEMO_AUDIT_DIR")
if _dir:
    _out = open(os.path.join(_dir, "%d.log" % os.getpid()), "a", buffering=1)

    def _hook(event, args):
        if event == "socket.connect":
            _out.write("connect %r\\n" % (args[1],))
        elif event == "socket.getaddrinfo":
            _out.write("getaddrinfo %r\\n" % (args[0],))
        elif event == "socket.sendto":
            _out.write("sendto %r\\n" % (args[1],))

    sys.addaudithook(_hook)
'''


def _netns_prefix() -> list[str]:
    """``unshare -rn`` with the loopback interface up, when this kernel lets an unprivileged user do it."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return []
    probe = subprocess.run(["unshare", "-rn", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30,
                           check=False)
    if probe.returncode != 0:
        return []
    return ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


def _run_demo(tmp_path: Path, *args: str, netns: bool = True) -> tuple[subprocess.CompletedProcess[str], Path]:
    hook_dir, audit, tmp = tmp_path / "hook", tmp_path / "audit", tmp_path / "tmp"
    for d in (hook_dir, audit, tmp):
        d.mkdir()
    (hook_dir / "sitecustomize.py").write_text(AUDIT_HOOK)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODELHERD_", "KUBECONFIG"))}
    env.update({"PYTHONPATH": str(hook_dir), "DEMO_AUDIT_DIR": str(audit), "TMPDIR": str(tmp),
                "HTTPS_PROXY": "http://192.0.2.1:3128", "HTTP_PROXY": "http://192.0.2.1:3128"})
    cmd = [*(_netns_prefix() if netns else []), MODELHERD, "demo", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False, cwd=tmp_path)
    return r, audit


def _audited(audit: Path) -> dict[str, list[tuple[str, object]]]:
    out: dict[str, list[tuple[str, object]]] = {}
    for log in audit.glob("*.log"):
        rows = []
        for line in log.read_text().splitlines():
            kind, _, rest = line.partition(" ")
            rows.append((kind, ast.literal_eval(rest)))
        out[log.stem] = rows
    return out


@pytest.mark.multiprocess
def test_demo_with_four_nodes_downloads_once_every_node_is_ready_and_verified_offline(tmp_path: Path) -> None:
    r, audit = _run_demo(tmp_path, "--nodes", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert re.search(r"origin bytes served: 64\.0 MiB for a 64\.0 MiB model = 1\.00 x the model \(one origin "
                     r"download; downloaded by node-\d\)", out), out
    assert "nodes Ready: 4/4" in out
    assert "verify --deep: OK (11 files" in out
    assert "demo OK" in out
    node_lines = re.findall(r"^  (node-\d)\s+Ready\s+(holder|follower)\s", out, re.M)
    assert sorted(n for n, _ in node_lines) == [f"node-{i}" for i in range(4)]
    assert [role for _, role in node_lines].count("holder") == 1
    assert re.search(r"lease holder node-\d\s+(Downloading|Verifying|Complete)", out), out  # the live view
    # the temporary folder is gone (no --keep), nothing else was made in TMPDIR
    assert list((tmp_path / "tmp").iterdir()) == []

    calls = _audited(audit)
    assert len(calls) == 5, calls  # the demo and its four node processes all ran under the hook
    connecting = {pid for pid, rows in calls.items() if any(k == "connect" for k, _ in rows)}
    assert len(connecting) == 1, calls  # the holder alone talks to the origin; followers wait on the lease file
    for pid, rows in calls.items():
        for kind, arg in rows:
            if kind == "getaddrinfo":
                assert arg in ("127.0.0.1", "localhost", None), (pid, kind, arg)
            elif isinstance(arg, tuple):  # AF_INET/AF_INET6 (host, port, ...)
                assert arg[0] == "127.0.0.1", (pid, kind, arg)


def test_demo_refuses_zero_nodes_with_a_usage_exit_code(tmp_path: Path) -> None:
    r, _ = _run_demo(tmp_path, "--nodes", "0", netns=False)
    assert r.returncode == 2
    assert "--nodes" in r.stderr and "e.g. modelherd demo --nodes 4" in r.stderr


def test_node_processes_get_no_proxy_token_kubeconfig_or_modelherd_setting_of_the_caller(tmp_path: Path) -> None:
    base = {"PATH": "/usr/bin", "HTTPS_PROXY": "http://proxy:3128", "http_proxy": "http://proxy:3128",
            "ALL_PROXY": "socks5://p", "HF_TOKEN": "hf_secret", "HF_ENDPOINT": "https://huggingface.co",
            "HUGGING_FACE_HUB_TOKEN": "hf_secret2", "KUBECONFIG": "/k", "MODELHERD_COORDINATION": "kubernetes",
            "OCI_CONFIG_FILE": "/o", "NODE_NAME": "real-node"}
    env = child_env(base, "http://127.0.0.1:1234", tmp_path)
    assert env["HF_ENDPOINT"] == "http://127.0.0.1:1234"
    assert env["HF_HOME"] == str(tmp_path / "hf-home")
    assert "127.0.0.1" in env["NO_PROXY"]
    assert env["PATH"] == "/usr/bin"
    assert not {"HTTPS_PROXY", "http_proxy", "ALL_PROXY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "KUBECONFIG",
                "MODELHERD_COORDINATION", "OCI_CONFIG_FILE", "NODE_NAME"} & env.keys()
    assert "hf_secret" not in " ".join(env.values())


@pytest.mark.multiprocess
def test_a_demo_that_does_not_finish_reports_failure_and_keeps_its_folder_with_the_node_logs(tmp_path: Path) -> None:
    import io

    from modelherd.agent.demo import DemoOptions, run_demo

    out = io.StringIO()
    result = run_demo(DemoOptions(nodes=2, size_bytes=1024 * 1024, shards=2, timeout_s=0.0, workdir=tmp_path),
                      out=out)
    text = out.getvalue()
    assert not result.ok
    assert "did not finish within 0s" in text and "demo FAILED" in text
    assert result.workdir.is_dir() and result.workdir.parent == tmp_path
    assert sorted(p.name for p in (result.workdir / "logs").iterdir()) == ["node-0.log", "node-1.log"]
    assert all(n.proc.poll() is not None for n in result.nodes)  # no node process outlives the demo
