"""OCISource through the real ``oci`` SDK (user-principal signer) against the loopback Object Storage."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from pathlib import Path

import google_crc32c
import pytest
from modelherd.storage.errors import (
    AuthError,
    ConfigError,
    RateLimitedError,
    SourceNotFoundError,
    TransientSourceError,
    UnsafePathError,
)
from modelherd.storage.hashing import hash_file
from modelherd.storage.retry import RetryPolicy
from modelherd.storage.sources import open_source
from modelherd.storage.sources.oci import OCISource, resolve_auth
from modelherd.storage.types import RemoteFile
from modelherd.storage.uri import parse_uri

from tests.oci_fixtures import OCIUserConfig
from tests.ociserver import Faults, OCIObjectServer
from tests.support import read_all

NS, BUCKET = "testns", "models"
FAST = RetryPolicy(retries=3, backoff_s=0.01, backoff_max_s=0.05)


def make_source(server: OCIObjectServer, cfg: OCIUserConfig, prefix: str = "llama/",
                retry: RetryPolicy = FAST) -> OCISource:
    return OCISource(parse_uri(f"oci://n/{NS}/b/{BUCKET}/o/{prefix}"), auth="user", config_file=str(cfg.path),
                     profile=cfg.profile, endpoint=server.url, retry=retry, pool_maxsize=8)




@pytest.fixture
def model(oci_server: OCIObjectServer) -> dict[str, bytes]:
    """Seven objects under ``llama/`` (pages of 3), a folder marker, a neighbour prefix and one outside."""
    files = {f"shard-{i}.bin": os.urandom(2000 + i) for i in range(5)}
    files["config.json"] = b'{"model_type": "llama"}'
    files["sub/tokenizer.json"] = b"{}" * 100
    for name, data in files.items():
        oci_server.put_object(NS, BUCKET, "llama/" + name, data)
    oci_server.put_object(NS, BUCKET, "llama/sub/", b"")  # console folder marker
    oci_server.put_object(NS, BUCKET, "llama2/other.bin", b"not this model")
    oci_server.put_object(NS, BUCKET, "readme.txt", b"outside")
    return files


def test_listing_paginates_strips_prefix_and_skips_markers(oci_server, oci_user_config, model):
    listing = make_source(oci_server, oci_user_config).list_files()
    assert sorted(f.path for f in listing.files) == sorted(model)
    assert {f.locator for f in listing.files} == {"llama/" + n for n in model}
    assert {f.path: f.size for f in listing.files} == {n: len(d) for n, d in model.items()}
    assert listing.total_bytes == sum(len(d) for d in model.values())
    assert oci_server.requests["list"] == 3  # 8 objects under llama/ (7 + marker) in pages of 3
    assert all("prefix=llama%2F" in p or "prefix=llama/" in p for _, p, _ in oci_server.request_log)


def test_listing_md5_matches_bytes(oci_server, oci_user_config, model):
    listing = make_source(oci_server, oci_user_config).list_files()
    for f in listing.files:
        assert f.checksums == {"md5": hashlib.md5(model[f.path]).hexdigest()}


def test_revision_is_stable_and_changes_when_an_object_is_overwritten(oci_server, oci_user_config, model):
    src = make_source(oci_server, oci_user_config)
    first, again = src.list_files().revision, src.list_files().revision
    assert first == again and len(first) == 40
    oci_server.put_object(NS, BUCKET, "llama/config.json", model["config.json"])  # same bytes, new ETag
    assert src.list_files().revision != first


def test_multipart_object_gets_crc32c_and_multipart_md5(oci_server, oci_user_config):
    data = os.urandom(10_000)
    oci_server.put_object(NS, BUCKET, "llama/big.safetensors", data, part_size=4096)
    f = make_source(oci_server, oci_user_config).list_files().files[0]
    parts = [data[i:i + 4096] for i in range(0, len(data), 4096)]
    mp = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
    assert f.checksums == {"md5-multipart": f"{mp}-3", "crc32c": f"{google_crc32c.value(data):08x}"}
    assert oci_server.requests["head"] == 1


def test_multipart_md5_in_listing_is_kept_informational(oci_user_config):
    data = os.urandom(9000)
    with OCIObjectServer(list_md5_for_multipart=True) as srv:
        srv.put_object(NS, BUCKET, "llama/big.bin", data, part_size=4096)
        f = make_source(srv, oci_user_config).list_files().files[0]
    assert "md5" not in f.checksums
    assert f.checksums["md5-multipart"].endswith("-3")
    assert f.checksums["crc32c"] == f"{google_crc32c.value(data):08x}"


def test_ranged_open_returns_exact_bytes(oci_server, oci_user_config, model):
    src = make_source(oci_server, oci_user_config)
    f = next(x for x in src.list_files().files if x.path == "shard-3.bin")
    data = model["shard-3.bin"]
    assert read_all(src.open(f)) == data
    assert read_all(src.open(f, 100, 1100), chunk=333) == data[100:1100]
    assert read_all(src.open(f, len(data) - 1)) == data[-1:]
    assert read_all(src.open(f, 5, 5)) == b""
    ranges = [r for m, n, r in oci_server.request_log if m == "GET" and n == "llama/shard-3.bin"]
    assert ranges == [f"bytes=0-{len(data) - 1}", "bytes=100-1099", f"bytes={len(data) - 1}-{len(data) - 1}"]


def test_open_of_an_object_overwritten_since_listing_fails(oci_server, oci_user_config, model):
    src = make_source(oci_server, oci_user_config)
    f = next(x for x in src.list_files().files if x.path == "config.json")
    oci_server.put_object(NS, BUCKET, "llama/config.json", b"X" * f.size)
    with pytest.raises(Exception, match="412") as ei:
        src.open(f)
    assert "pull again" in str(ei.value)


def test_missing_bucket_is_a_clear_not_found(oci_server, oci_user_config):
    src = OCISource(parse_uri(f"oci://n/{NS}/b/nosuchbucket/o/llama"), auth="user",
                    config_file=str(oci_user_config.path), endpoint=oci_server.url, retry=FAST)
    with pytest.raises(SourceNotFoundError) as ei:
        src.list_files()
    text = str(ei.value)
    assert "404" in text and "BucketNotFound" in text and "nosuchbucket" in text
    assert "policy" in (ei.value.hint or "")
    assert oci_server.requests["list"] == 0 and oci_server.requests["other"] == 1  # no retries on 404


def test_missing_object_is_not_found(oci_server, oci_user_config, model):
    src = make_source(oci_server, oci_user_config)
    ghost = RemoteFile(path="ghost.bin", size=10, locator="llama/ghost.bin")
    with pytest.raises(SourceNotFoundError, match="ObjectNotFound"):
        src.open(ghost)


def test_429_then_success_backs_off_and_honours_retry_after(oci_server, oci_user_config, model):
    src = make_source(oci_server, oci_user_config)
    f = next(x for x in src.list_files().files if x.path == "config.json")
    oci_server.inject("llama/config.json", Faults(status_429=2, retry_after=0.3))
    t0 = time.monotonic()
    assert read_all(src.open(f)) == model["config.json"]
    assert time.monotonic() - t0 >= 0.6  # two waits of at least Retry-After
    assert [m for m, n, _ in oci_server.request_log if n == "llama/config.json"] == ["GET"] * 3


def test_429_without_retry_after_exhausts_retries_as_rate_limited(oci_server, oci_user_config, model):
    src = make_source(oci_server, oci_user_config, retry=RetryPolicy(retries=2, backoff_s=0.01, backoff_max_s=0.02))
    f = next(x for x in src.list_files().files if x.path == "config.json")
    oci_server.inject("llama/config.json", Faults(status_429=10))
    with pytest.raises(RateLimitedError) as ei:
        src.open(f)
    assert ei.value.retry_after is None
    assert oci_server.requests["get"] == 3


def test_5xx_on_listing_is_retried(oci_server, oci_user_config, model):
    oci_server.list_faults = Faults(status_5xx=2, code_5xx=500)
    listing = make_source(oci_server, oci_user_config).list_files()
    assert len(listing.files) == len(model)
    assert oci_server.requests["list"] == 5  # 2 failures + 3 pages


def test_503_everywhere_ends_as_transient_error(oci_server, oci_user_config, model):
    src = make_source(oci_server, oci_user_config)
    f = next(x for x in src.list_files().files if x.path == "config.json")
    oci_server.inject("llama/config.json", Faults(status_5xx=100, code_5xx=503))
    with pytest.raises(TransientSourceError, match="503"):
        src.open(f)


def test_truncated_body_raises_transient_error(oci_server, oci_user_config, model):
    src = make_source(oci_server, oci_user_config)
    f = next(x for x in src.list_files().files if x.path == "shard-0.bin")
    oci_server.inject("llama/shard-0.bin", Faults(truncate=1, truncate_at=0.5))
    with pytest.raises(TransientSourceError):
        read_all(src.open(f), chunk=256)
    assert read_all(src.open(f)) == model["shard-0.bin"]  # the next attempt gets the whole body


def test_slow_body_still_arrives_whole(oci_server, oci_user_config, model):
    src = make_source(oci_server, oci_user_config)
    f = next(x for x in src.list_files().files if x.path == "shard-4.bin")
    oci_server.inject("llama/shard-4.bin", Faults(rate_bps=8000))
    t0 = time.monotonic()
    assert read_all(src.open(f)) == model["shard-4.bin"]
    assert time.monotonic() - t0 >= 0.15


@pytest.mark.parametrize("evil", ["llama/../../etc/passwd", "llama/a/../../../x", "llama//abs", "llama/a\\b"])
def test_malicious_object_name_is_refused(oci_server, oci_user_config, model, evil):
    oci_server.put_object(NS, BUCKET, evil, b"pwned")
    with pytest.raises(UnsafePathError):
        make_source(oci_server, oci_user_config).list_files()


def test_file_that_is_also_a_folder_is_refused(oci_server, oci_user_config):
    oci_server.put_object(NS, BUCKET, "llama/x", b"1")
    oci_server.put_object(NS, BUCKET, "llama/x/y", b"2")
    with pytest.raises(UnsafePathError, match="both a file and a folder"):
        make_source(oci_server, oci_user_config).list_files()


def test_secrets_never_appear_in_errors(oci_server, oci_user_config, model):
    src = make_source(oci_server, oci_user_config)
    errors: list[BaseException] = []
    for uri in (f"oci://n/{NS}/b/nosuchbucket/o/x", f"oci://n/{NS}/b/{BUCKET}/o/llama"):
        s = OCISource(parse_uri(uri), auth="user", config_file=str(oci_user_config.path), endpoint=oci_server.url,
                      retry=FAST)
        oci_server.list_faults = Faults(status_5xx=100)
        try:
            s.list_files()
        except Exception as e:
            errors.append(e)
    oci_server.list_faults = Faults()
    f = next(x for x in src.list_files().files if x.path == "config.json")
    oci_server.inject("llama/config.json", Faults(status_429=100))
    with pytest.raises(RateLimitedError) as ei:
        src.open(f)
    errors.append(ei.value)
    with pytest.raises(AuthError) as ei2:
        OCISource(parse_uri(f"oci://n/{NS}/b/{BUCKET}/o/llama"), auth="user", config_file=str(oci_user_config.path),
                  profile="NOPE", endpoint=oci_server.url)
    errors.append(ei2.value)
    key_body = "".join(oci_user_config.key_pem.splitlines()[1:-1])
    assert len(errors) == 4
    for e in errors:
        text = f"{e!s} {e!r} {e.__cause__!r} {e.__context__!r}"
        assert oci_user_config.fingerprint not in text
        assert key_body[:40] not in text and "PRIVATE KEY" not in text
        assert oci_user_config.user not in text


def test_requests_are_signed_with_the_user_key(oci_server, oci_user_config, model):
    """The SDK's API-key signer sends keyId="tenancy/user/fingerprint" (the server records, not verifies, it)."""
    make_source(oci_server, oci_user_config).list_files()
    c = oci_user_config
    assert oci_server.key_ids == {f"{c.tenancy}/{c.user}/{c.fingerprint}"}


def test_rejected_signature_is_an_auth_error_without_retries(oci_server, oci_user_config, model):
    oci_server.list_faults = Faults(status_401=1)
    with pytest.raises(AuthError, match="401 NotAuthenticated"):
        make_source(oci_server, oci_user_config).list_files()
    assert oci_server.requests["list"] == 1


def test_server_refuses_unsigned_requests(oci_server, model):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(f"{oci_server.url}/n/{NS}/b/{BUCKET}/o", timeout=5)
    assert ei.value.code == 401


def test_auto_auth_prefers_config_file_then_workload_identity_then_instance_principal(tmp_path, oci_user_config):
    token = tmp_path / "token"
    token.write_text("t")
    assert resolve_auth("auto", str(oci_user_config.path), {}) == "user"
    missing = str(tmp_path / "nope")
    env = {"OCI_RESOURCE_PRINCIPAL_VERSION": "2.2", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert resolve_auth("auto", missing, env, sa_token_path=str(token)) == "workload_identity"
    assert resolve_auth("auto", missing, {"OCI_RESOURCE_PRINCIPAL_VERSION": "2.2"}) == "resource_principal"
    assert resolve_auth("auto", missing, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == "instance_principal"
    assert resolve_auth("workload_identity", str(oci_user_config.path), {}) == "workload_identity"
    with pytest.raises(ConfigError, match="unknown OCI auth mode"):
        resolve_auth("password", missing, {})


def test_pool_fits_concurrency(oci_server, oci_user_config):
    src = OCISource(parse_uri(f"oci://n/{NS}/b/{BUCKET}/o/llama"), auth="user",
                    config_file=str(oci_user_config.path), endpoint=oci_server.url, pool_maxsize=48)
    session = src._client.base_client.session
    assert session.get_adapter("http://127.0.0.1/")._pool_maxsize == 48
    assert session.get_adapter("https://objectstorage.example/")._pool_maxsize == 48


def test_factory_builds_oci_source_and_it_downloads(oci_server, oci_user_config, model, tmp_path: Path):
    src = open_source(parse_uri(f"oci://n/{NS}/b/{BUCKET}/o/llama/"), oci_auth="user",
                      oci_config_file=str(oci_user_config.path), oci_endpoint=oci_server.url, retry=FAST)
    assert isinstance(src, OCISource)
    for f in src.list_files().files:
        out = tmp_path / f.path
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(read_all(src.open(f)))
        assert hash_file(str(out), ["md5"]) == f.checksums
    assert oci_server.body_bytes == sum(len(d) for d in model.values())
    src.close()


def test_region_from_uri_reaches_the_client(oci_user_config):
    src = OCISource(parse_uri(f"oci://{NS}@eu-frankfurt-1/{BUCKET}/llama"), auth="user",
                    config_file=str(oci_user_config.path))
    assert "eu-frankfurt-1" in src._client.base_client.endpoint


def test_crc32c_header_is_big_endian_base64():
    from modelherd.storage.sources.oci import checksums_from_headers

    data = b"hello world"
    crc = google_crc32c.value(data)
    hdr = base64.b64encode(crc.to_bytes(4, "big")).decode()
    assert checksums_from_headers({"opc-content-crc32c": hdr}) == {"crc32c": f"{crc:08x}"}
    assert checksums_from_headers({"opc-content-crc32c": "not base64!"}) == {}


@pytest.mark.multiprocess
def test_standalone_server_process_serves_a_folder_until_sigterm(tmp_path, oci_user_config):
    import signal
    import subprocess
    import sys

    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"a" * 5000)
    (folder / "sub" / "b.json").write_bytes(b"{}")
    proc = subprocess.Popen([sys.executable, "-m", "tests.ociserver", "--bucket", f"ns1/b1={folder}:models/m/",
                             "--port", "0", "--multipart-part-mib", "1"],
                            cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        src = OCISource(parse_uri("oci://n/ns1/b/b1/o/models/m"), auth="user", config_file=str(oci_user_config.path),
                        endpoint=url, retry=FAST)
        files = {f.path: f for f in src.list_files().files}
        assert sorted(files) == ["a.bin", "sub/b.json"]
        assert read_all(src.open(files["a.bin"], 10, 20)) == b"a" * 10
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "served 10 body bytes" in err


def test_factory_hands_hf_options_to_hfsource():
    hf = pytest.importorskip("modelherd.storage.sources.hf")
    src = open_source(parse_uri("hf://org/model"), hf_token="hf_x", hf_endpoint="http://127.0.0.1:9", pool_maxsize=8)
    assert isinstance(src, hf.HFSource) and src.uri == "hf://org/model"
