"""Settings come from the environment, and every flag the user gave wins over it."""

from __future__ import annotations

import pytest
from modelherd.agent.cli import build_parser, load_settings


def test_flags_win_over_the_environment_and_the_environment_over_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELHERD_CONCURRENCY", "7")
    monkeypatch.setenv("NODE_NAME", "env-node")
    monkeypatch.setenv("MODELHERD_DIRECT_IO", "off")
    args = build_parser().parse_args(["pull", "hf://org/m", "--concurrency", "3", "--direct-io", "on"])
    s = load_settings(args)
    assert (s.concurrency, s.direct_io, s.node_name) == (3, "on", "env-node")
    s = load_settings(build_parser().parse_args(["pull", "hf://org/m"]))
    assert (s.concurrency, s.direct_io, s.multipart_concurrency) == (7, "off", 4)


def test_an_invalid_flag_value_is_a_validation_error() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        load_settings(build_parser().parse_args(["pull", "hf://org/m", "--concurrency", "0"]))
