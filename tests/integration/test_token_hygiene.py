"""A Secret value that is not a token (a PEM private key put there by mistake) never reaches a message or a log
line: refused before any request to the loopback Hub, a header error never quoted, and the agent's logging
filter as the net under both."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from modelherd.agent import logredact
from modelherd.agent.cli import JsonFormatter
from modelherd.storage.errors import ConfigError
from modelherd.storage.retry import RetryPolicy
from modelherd.storage.sources import hf as hf_module
from modelherd.storage.sources import open_source
from modelherd.storage.sources.hf import HEADER_MESSAGE, HFSource
from modelherd.storage.uri import parse_uri

from tests.hub_fixtures import HUB_TOKEN, LFS_MIN_SIZE
from tests.hubserver import HubServer

FAST = RetryPolicy(retries=3, backoff_s=0.01, backoff_max_s=0.05)
PEM = ("-----BEGIN PRIVATE KEY-----\n"
       "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n"
       "MzEfYyjiWA4R4/M2bS1GB4t7NXp98C3SC6dVMvDuictGeurT8jNbvJZHtCSuYEvu\n"
       "-----END PRIVATE KEY-----\n")
PEM_LINES = [line for line in PEM.splitlines() if line]


def assert_no_line_of(secret: str, text: str) -> None:
    for line in secret.splitlines():
        if line.strip():
            assert line.strip() not in text, f"{line.strip()!r} leaked into {text[:300]!r}"
    assert "BEGIN" not in text and "MIIE" not in text and "MzEf" not in text


@pytest.fixture
def repo(hub_server: HubServer, small_model: Path) -> str:
    return hub_server.add_repo("org/private", small_model, token=HUB_TOKEN, lfs_min_size=LFS_MIN_SIZE)


def test_a_multi_line_token_is_refused_at_construction_before_any_request_without_quoting_it(
        hub_server: HubServer, repo: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for make in (lambda: HFSource(parse_uri("hf://org/private"), token=PEM, endpoint=hub_server.endpoint, retry=FAST),
                 lambda: open_source(parse_uri("hf://org/private"), hf_token=PEM.strip(),
                                     hf_endpoint=hub_server.endpoint, retry=FAST)):
        with pytest.raises(ConfigError) as ei:
            make()
        err = ei.value
        assert "Hugging Face token" in err.message and f"{len(PEM.strip())} characters" in err.message
        assert err.exit_code == 2 and err.hint
        for text in (str(err), repr(err), err.message, err.hint or "", caplog.text):
            assert_no_line_of(PEM, text)
    assert hub_server.request_log == [], "a refused token must not reach the Hub"


def test_a_header_value_that_slips_past_the_check_fails_once_with_a_fixed_message(
        hub_server: HubServer, repo: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second line of defence, on the real code path: were ``check_token`` to let a PEM through, httpx/h11
    (listing) and urllib3/http.client (bodies) refuse the header with an error that quotes it; the source maps
    both to one fixed message, never retried, never quoting the error."""
    files = {f.path: f for f in HFSource(parse_uri("hf://org/private"), token=HUB_TOKEN,
                                         endpoint=hub_server.endpoint, retry=FAST).list_files().files}
    hub_server.reset_counters()
    caplog.set_level(logging.DEBUG)
    # httpcore's DEBUG trace logs the refused header's error as it is: the agent's filter is the net for that
    logredact.register_secret(PEM)
    logredact.install([caplog.handler])
    monkeypatch.setattr(hf_module, "check_token", lambda value, *, what: value)
    src = HFSource(parse_uri("hf://org/private"), token=PEM.strip(), endpoint=hub_server.endpoint, retry=FAST)
    failures = []
    for attempt in (src.list_files, lambda: src.open(files["config.json"]),
                    lambda: src.open(files["model.safetensors"], 10, 20)):
        with pytest.raises(ConfigError) as ei:
            attempt()
        failures.append(ei.value)
    for err in failures:
        assert HEADER_MESSAGE in err.message and "token" in (err.hint or "")
        assert "Illegal" not in str(err) and "Invalid header value" not in str(err)
        assert_no_line_of(PEM, f"{err} {err!r}")
    assert_no_line_of(PEM, caplog.text)
    assert hub_server.request_log == [], "a request whose header cannot be sent is neither sent nor retried"


# -- the agent's logging filter ---------------------------------------------------------------------------


def _logger(name: str, formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    logredact.install([handler])
    logger = logging.getLogger(f"test_token_hygiene.{name}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, out


def _log_everywhere(logger: logging.Logger, secret: str) -> None:
    logger.error(f"in the message: Bearer {secret}")
    logger.error("in the args: %s and %r", secret, {"authorization": f"Bearer {secret}"})
    try:
        try:
            raise ValueError(f"Illegal header value {f'Bearer {secret}'.encode()!r}")
        except ValueError as inner:
            raise RuntimeError("sending failed") from inner
    except RuntimeError:
        logger.exception("in the traceback")
    logger.warning("in an extra field", extra={"reason": f"token {secret}"})
    logger.warning("in the stack %s", "info", stack_info=True, extra={"note": secret.splitlines()[1]})


@pytest.mark.parametrize("formatter", [logging.Formatter("%(levelname)s %(name)s: %(message)s"), JsonFormatter()],
                         ids=["text", "json"])
def test_the_filter_removes_a_registered_secret_from_message_args_traceback_and_extras(
        formatter: logging.Formatter) -> None:
    logredact.register_secret(PEM)
    logger, out = _logger(type(formatter).__name__, formatter)
    _log_everywhere(logger, PEM.strip())
    text = out.getvalue()
    assert_no_line_of(PEM, text)
    assert "in the message: Bearer ***" in text and "in the args: ***" in text
    assert "Traceback" in text and "RuntimeError: sending failed" in text and "ValueError" in text
    if isinstance(formatter, JsonFormatter):
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        assert [r["msg"].splitlines()[0] for r in lines] == [
            "in the message: Bearer ***", "in the args: *** and {'authorization': 'Bearer ***'}",
            "in the traceback", "in an extra field", "in the stack info"]
        assert lines[3]["reason"] == "token ***" and lines[4]["note"] == "***"


def test_a_record_without_a_secret_keeps_its_exception_for_every_formatter() -> None:
    logredact.register_secret("hf_RegisteredButNotLogged0123")
    logger, out = _logger("clean", JsonFormatter())
    try:
        raise KeyError("nothing secret")
    except KeyError:
        logger.exception("plain %s", "failure")
    record = json.loads(out.getvalue())
    assert record["msg"] == "plain failure" and "KeyError: 'nothing secret'" in record["error"]


def test_short_values_are_not_registered_so_ordinary_words_survive() -> None:
    logredact.register_secret("true")
    logredact.register_secret("  abc  ")
    logger, out = _logger("short", logging.Formatter("%(message)s"))
    logger.info("true abc")
    assert out.getvalue().strip() == "true abc"


def test_the_agent_logging_setup_registers_hf_token_and_filters_every_root_handler(tmp_path: Path) -> None:
    """``cli._setup_logging`` in a real process: HF_TOKEN from the Settings is redacted from what any logger
    writes to stderr, message and traceback, in the JSON format the chart uses."""
    script = (
        "import logging\n"
        "from modelherd.agent.cli import _setup_logging\n"
        "from modelherd.agent.settings import Settings\n"
        "_setup_logging(Settings(log_format='json'))\n"
        "import os; tok = os.environ['HF_TOKEN']\n"
        "logging.getLogger('modelherd.x').warning('token %s', tok)\n"
        "try:\n"
        "    raise ValueError(repr(('Bearer ' + tok).encode()))\n"
        "except ValueError:\n"
        "    logging.getLogger('huggingface_hub.y').exception('failed')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODELHERD_", "KUBECONFIG"))}
    env["HF_TOKEN"] = PEM
    r = subprocess.run([sys.executable, "-c", script], env=env, text=True, capture_output=True, timeout=60,
                       check=False, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert [rec["msg"].splitlines()[0] for rec in records] == ["token ***", "failed"]
    assert "ValueError" in records[1]["msg"] + records[1].get("error", "")
    assert_no_line_of(PEM, r.stderr)


def test_modelherd_pull_with_a_pem_in_hf_token_exits_2_before_any_request_without_printing_it(
        hub_server: HubServer, repo: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODELHERD_", "KUBECONFIG"))}
    env.update({"HF_ENDPOINT": hub_server.endpoint, "HF_TOKEN": PEM})
    r = subprocess.run([sys.executable, "-m", "modelherd.agent.cli", "pull", "hf://org/private", "--models-root",
                        str(tmp_path / "models"), "--no-progress", "--log-level", "DEBUG", "--log-format", "json"],
                       env=env, text=True, capture_output=True, timeout=120, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Hugging Face token" in r.stderr and "line break" in r.stderr
    assert_no_line_of(PEM, r.stdout + r.stderr)
    assert hub_server.request_log == []
