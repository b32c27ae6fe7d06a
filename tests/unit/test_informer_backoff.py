"""An informer whose API server cannot be reached backs off (jittered, capped) instead of looping.

No control plane needed: a real ``kubernetes`` ApiClient pointed at a loopback server that resets every
connection (a :class:`TcpProxy` kept cut), which also counts the connections the informer made.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
from kubernetes import client
from modelherd.agent.watching.informer import RESTART_REASONS, Informer
from modelherd.storage.errors import ConfigError

from tests.tcpproxy import TcpProxy


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: connections are refused


def _api(port: int) -> client.ApiClient:
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{port}"
    cfg.api_key = {"BearerToken": "secret-token-value"}
    cfg.api_key_prefix = {"BearerToken": "Bearer"}
    return client.ApiClient(cfg)


def _ignore(*_: Any) -> None:
    return None


def test_unreachable_api_server_is_retried_with_capped_backoff_not_a_tight_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reasons: list[str] = []
    resetter = TcpProxy("127.0.0.1", _dead_port())
    resetter.cut()
    api = _api(resetter.port)
    inf = Informer(api, "/api/v1/nodes", handler=_ignore, name="node", backoff_max_s=0.4, on_restart=reasons.append)
    inf.start()
    try:
        time.sleep(3.0)
        # backoff 0.5 s * 2^n capped at 0.4 s, drawn from [cap/2, cap): at most 3.0/0.2 + 1 attempts
        assert 5 <= inf.requests <= 16, inf.requests
        # every attempt is one request the server sees: no hidden urllib3 retries
        assert resetter.accepted in (inf.requests, inf.requests - 1), (resetter.accepted, inf.requests)
        assert inf.restarts == len(reasons) in (inf.requests, inf.requests - 1)  # one per failed attempt
        assert set(reasons) == {"connection"} and set(reasons) <= set(RESTART_REASONS)
        assert not inf.has_synced() and not inf.wait_synced(0.01)
        assert inf.resource_version == ""
        assert not inf.healthy(max_age_s=1.0)  # nothing read for 3 s
        assert inf.healthy(max_age_s=60.0)  # measured from start()
        t0 = time.monotonic()
        inf.stop()  # in the middle of a backoff sleep
        assert time.monotonic() - t0 < 1.0
        assert not inf.healthy(max_age_s=60.0)
        assert "secret-token-value" not in caplog.text
    finally:
        inf.stop()
        api.close()
        resetter.close()


def test_backoff_doubles_from_half_a_second_up_to_the_cap_with_jitter() -> None:
    inf = Informer(_api(_dead_port()), "/api/v1/nodes", handler=_ignore, name="n", backoff_max_s=30.0)
    for failures, d in ((1, 0.5), (2, 1.0), (3, 2.0), (7, 30.0), (100, 30.0)):
        delays = [inf._backoff(failures, None) for _ in range(200)]
        assert all(d / 2 <= x < d for x in delays), (failures, min(delays), max(delays))
        assert max(delays) - min(delays) > d / 10  # jittered: agents do not retry in lockstep
    assert inf._backoff(1, retry_after=5.0) == 5.0  # 429's Retry-After is respected


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"path": "apis/ome.io/v1beta1/basemodels"}, "not a URL path"),
    ({"watch_timeout_s": 0.5}, "below 1 s"),
    ({"backoff_max_s": 0}, "must be positive"),
])
def test_bad_arguments_raise_a_config_error_with_a_hint(kwargs: dict[str, Any], needle: str) -> None:
    args: dict[str, Any] = {"path": "/api/v1/nodes", "handler": _ignore, "name": "n", **kwargs}
    path = args.pop("path")
    with pytest.raises(ConfigError, match=needle):
        Informer(_api(_dead_port()), path, **args)
