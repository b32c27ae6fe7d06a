"""Pytest plugin: a real loopback Hugging Face Hub (``tests.hubserver``).

Fixtures
--------
``hub_server``
    A started :class:`~tests.hubserver.HubServer` (API host + CDN host on 127.0.0.1, page size 50),
    stopped at teardown. Register repos with ``hub_server.add_repo(repo_id, folder, ...)``.
``small_model``
    A folder made by :func:`make_small_model` in ``tmp_path``.

Helper
------
``make_small_model(folder, *, lfs_file_size=..., seed=0)``
    A few small random files: ``config.json``, ``tokenizer.json``, a nested ``sub/extra.bin`` and one
    ``model.safetensors``-named blob above :data:`LFS_MIN_SIZE` (random bytes, not a real safetensors
    file; ``tests/modelgen.py`` makes real ones).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hubserver import HubServer

LFS_MIN_SIZE = 64 * 1024
HUB_TOKEN = "hf_TestTokenDoNotLeak0123456789"


def make_small_model(folder: Path, *, lfs_file_size: int = 3 * 1024 * 1024 + 17, seed: int = 0) -> Path:
    """Write a small random model into ``folder`` (created) and return it. Deterministic per ``seed``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "test", "seed": seed, "hidden": 64}))
    (folder / "tokenizer.json").write_text(json.dumps({"vocab": [f"t{i}" for i in range(200)]}))
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "extra.bin").write_bytes(rng.randbytes(10_000))
    (folder / "model.safetensors").write_bytes(rng.randbytes(lfs_file_size))
    return folder


@pytest.fixture
def hub_server() -> Iterator[HubServer]:
    hub = HubServer(page_size=50)
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    return make_small_model(tmp_path / "small-model")
