"""The CLI's start-up GC pause: on only if it was on, and never left off."""

from __future__ import annotations

import gc
import subprocess
import sys

from modelherd.agent import startup


def test_pause_then_resume_turns_the_collector_back_on_and_freezes_what_was_loaded() -> None:
    assert gc.isenabled()
    try:
        startup.pause()
        assert not gc.isenabled()
        startup.resume()
        assert gc.isenabled() and gc.get_freeze_count() > 0
        startup.resume()  # idempotent
        assert gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()


def test_resume_leaves_a_collector_someone_else_turned_off_alone() -> None:
    gc.disable()
    try:
        startup.pause()  # already off: not ours to turn back on
        startup.resume()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_collector_is_on_again_when_a_command_ends_whatever_it_did() -> None:
    code = ("import gc, sys; from modelherd.agent import cli;"
            "rc = cli.main(['verify', '/nonexistent-folder']);"
            "print(gc.isenabled(), rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["True", "2"], r.stdout + r.stderr
