"""Credentials: what check_token lets through, what it says when it refuses, and what redact removes."""

from __future__ import annotations

import json
from urllib.parse import quote, quote_plus

import pytest
from modelherd.storage.credentials import MAX_TOKEN_LENGTH, REDACTED, check_token, redact
from modelherd.storage.errors import ConfigError

WHAT = "Secret team-a/hf (spec.storage.key) key 'token'"
PEM = ("-----BEGIN PRIVATE KEY-----\n"
       "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n"
       "MzEfYyjiWA4R4/M2bS1GB4t7NXp98C3SC6dVMvDuictGeurT8jNbvJZHtCSuYEvu\n"
       "-----END PRIVATE KEY-----\n")
HF_TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"


def refusal(value: str) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        check_token(value, what=WHAT)
    return ei.value


def assert_reveals_nothing(err: ConfigError, value: str) -> None:
    text = f"{err} {err!r} {err.message} {err.hint}"
    for line in value.split():
        assert line not in text, f"the message quotes {line!r}"
    assert repr(value.strip())[1:-1] not in text


@pytest.mark.parametrize("token", [HF_TOKEN, "hf_x", "~!#$%&'*+-.^_`|0123456789", "a" * MAX_TOKEN_LENGTH])
def test_a_header_safe_token_passes_unchanged(token: str) -> None:
    assert check_token(token, what=WHAT) == token


def test_surrounding_whitespace_and_a_trailing_newline_are_stripped() -> None:
    assert check_token(f"  {HF_TOKEN}\n", what=WHAT) == HF_TOKEN
    assert check_token(f"\t{HF_TOKEN}\r\n", what=WHAT) == HF_TOKEN


def test_a_pem_private_key_is_refused_naming_the_secret_and_length_without_quoting_it() -> None:
    err = refusal(PEM)
    assert WHAT in err.message and str(len(PEM.strip())) in err.message
    assert "line break" in err.message and "space" in err.message
    assert err.hint and "one line" in err.hint
    assert_reveals_nothing(err, PEM)
    for fragment in ("BEGIN", "PRIVATE", "MIIE", "-----"):
        assert fragment not in str(err)


@pytest.mark.parametrize(("value", "kind"), [
    ("hf_abc def", "a space"),
    ("hf_abc\ndef", "a line break"),
    ("hf_abc\rdef", "a line break"),
    ("hf_abc\x00def", "a control character"),
    ("hf_abc\x7fdef", "a control character"),
    ("hf_abc\x85def", "a control character"),
    ("hf_abcédef", "a non-ASCII character"),
    ("hf_abc\u2028def", "a non-ASCII character"),
    ("hf_abc\u00a0def", "a non-ASCII character"),
    ("hf_🔑_secret", "a non-ASCII character"),
], ids=["space", "newline", "carriage-return", "nul", "del", "c1-nel", "accent", "line-separator", "nbsp", "emoji"])
def test_a_token_no_http_header_can_carry_is_refused_saying_which_kind_of_character(value: str, kind: str) -> None:
    err = refusal(value)
    assert kind in err.message and f"{len(value)} characters" in err.message
    assert "abc" not in str(err) and "def" not in str(err) and "secret" not in str(err)


@pytest.mark.parametrize("value", ["", "   ", "\n\t\r\n"], ids=["empty", "spaces", "whitespace"])
def test_an_empty_token_is_refused(value: str) -> None:
    err = refusal(value)
    assert err.message == f"{WHAT} is empty" and err.hint


def test_a_5000_character_value_is_refused_by_its_length_without_quoting_it() -> None:
    value = "hf_" + "Zq9" * 1665 + "XY"
    assert len(value) == 5000
    err = refusal(value)
    assert "5000 characters" in err.message and str(MAX_TOKEN_LENGTH) in err.message
    assert "Zq9" not in str(err) and "hf_" not in err.message


def test_the_refusal_is_a_config_error_with_exit_code_2() -> None:
    assert refusal(PEM).exit_code == 2


# -- redact --------------------------------------------------------------------------------------


def test_the_raw_secret_and_a_bearer_header_holding_it_are_replaced() -> None:
    text = f"sent Authorization: Bearer {HF_TOKEN} to the Hub; token={HF_TOKEN}"
    assert redact(text, [HF_TOKEN]) == f"sent Authorization: Bearer {REDACTED} to the Hub; token={REDACTED}"


def test_the_header_error_of_a_multi_line_secret_loses_every_line() -> None:
    """What h11 and http.client said on main: the bytes repr of the whole header, ``\\n`` as backslash-n."""
    value = PEM.strip()
    for message in (f"Illegal header value {f'Bearer {value}'.encode()!r}",
                    f"Invalid header value {f'Bearer {value}'.encode()!r}",
                    f"header {('Bearer ' + value)!r}"):
        out = redact(message, [value])
        assert "BEGIN" not in out and "MIIE" not in out and "MzEf" not in out, out
        assert REDACTED in out


def test_escaped_and_encoded_forms_are_replaced() -> None:
    secret = "hf_a'b\"c/d+e f\\g\tHé"
    forms = [repr(secret), repr(secret.encode()), json.dumps(secret), json.dumps(secret, ensure_ascii=False),
             quote(secret), quote(secret, safe=""), quote_plus(secret), repr(secret + "'\""),
             repr({"token": secret}), json.dumps({"t": secret})]
    for form in forms:
        out = redact(f"<<{form}>>", [secret])
        assert "hf_a" not in out and "Hé" not in out and "H\\xc3" not in out and "%C3" not in out, (form, out)


def test_a_quote_in_the_secret_is_replaced_whichever_quote_the_repr_around_it_picked() -> None:
    secret = "hf_it's-a-token"
    for form in (repr(secret), repr(f'say "{secret}"'), repr(secret.encode()), repr(f'say "{secret}"'.encode())):
        assert "hf_it" not in redact(form, [secret]), form


def test_each_long_line_of_a_multi_line_secret_is_replaced_on_its_own() -> None:
    lines = PEM.strip().splitlines()
    text = f"a fragment: {lines[1]} and another {lines[2]!r} and {quote(lines[2], safe='')}"
    out = redact(text, [PEM])
    assert lines[1] not in out and lines[2] not in out and quote(lines[2], safe="") not in out
    assert out.startswith("a fragment: ***")


def test_short_lines_of_a_multi_line_secret_are_not_redacted_alone() -> None:
    secret = "line-one-is-long\nab\n"
    assert redact("ab cab", [secret]) == "ab cab"
    assert redact("x line-one-is-long y", [secret]) == "x *** y"


def test_a_secret_with_surrounding_whitespace_is_replaced_in_its_stripped_form() -> None:
    assert redact(f"Bearer {HF_TOKEN}", [f"  {HF_TOKEN}\n"]) == f"Bearer {REDACTED}"


def test_every_secret_of_several_is_replaced_and_other_text_is_kept() -> None:
    other = "oci_ABCDEFGH12345678"
    assert redact(f"{HF_TOKEN} / {other} / plain", [HF_TOKEN, other]) == "*** / *** / plain"


def test_no_secrets_or_empty_secrets_leave_the_text_alone() -> None:
    assert redact("nothing to hide", []) == "nothing to hide"
    assert redact("nothing to hide", ["", ""]) == "nothing to hide"


def test_a_lone_surrogate_in_a_secret_does_not_break_redaction() -> None:
    secret = "hf_abc\udcffdefghij"
    assert redact(f"x {secret} y", [secret]) == "x *** y"
