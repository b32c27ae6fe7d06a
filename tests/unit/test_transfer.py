"""agent/transfer.py: the one mapping from the transfer settings to the storage layer, the GPU shape detected once."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from modelherd.agent import transfer
from modelherd.agent.settings import Settings
from modelherd.storage import gpu


@pytest.fixture(autouse=True)
def _fresh_shape_cache() -> Iterator[None]:
    transfer._shape.cache_clear()
    yield
    transfer._shape.cache_clear()


def test_the_gpu_shape_is_detected_once_per_process_and_argument_set(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def detect(**kw: Any) -> gpu.GpuShape:
        calls.append(kw)
        return gpu.GpuShape("H200", 8)

    monkeypatch.setattr(gpu, "detect_gpu_shape", detect)
    move = Settings(gpu_shape="auto", instance_type_map='{"BM.GPU.H200.8": "H200"}').transfer
    for _ in range(3):
        assert transfer.gpu_shape(move, instance_type="BM.GPU.H200.8") == gpu.GpuShape("H200", 8)
    assert len(calls) == 1 and calls[0]["instance_type_map"] == {"BM.GPU.H200.8": "H200"}
    transfer.gpu_shape(move, instance_type="BM.GPU.H100.8")
    assert len(calls) == 2
    assert transfer.gpu_shape(replace(move, gpu_shape="none")) is None
    assert transfer.gpu_shape(replace(move, gpu_shape="A100x4")) == gpu.GpuShape("A100", 4)
    assert len(calls) == 2


def test_direct_io_auto_follows_the_storage_mode_in_force() -> None:
    move = Settings().transfer
    assert transfer.engine_options(move, "local").direct_io == "on"
    assert transfer.engine_options(move, "shared").direct_io == "off"
    assert transfer.engine_options(replace(move, direct_io="on"), "shared").direct_io == "on"
    assert transfer.engine_options(move, "local").retry == transfer.retry_policy(move)
