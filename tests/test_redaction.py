"""Redaction finds secrets and token shapes, never ordinary code; tokens carry a checksum."""

from __future__ import annotations

import secrets

import pytest

from critique_local.redact import MARK, Redactor
from critique_local.tokens import API_KEY_PREFIX, SANDBOX_TOKEN_PREFIX, is_token, new_token

CODE = [
    "crs_transform_to_web_mercator_epsg3857",  # GIS: coordinate reference systems
    "crs_" + "A" * 49,  # our shape, but no valid checksum
    "crt_" + "Q" * 43,  # the old key shape: not recognisable without a checksum
    "def crt_parse_timestamp_with_offset_and_zone(value):",
    "ghp_build_the_docs_for_every_release_2024",  # underscores: not a GitHub token
    "ghs_" + "a" * 35,  # one character short
    "sk-or-v1-not-a-key",
]


@pytest.mark.parametrize("prefix", [API_KEY_PREFIX, SANDBOX_TOKEN_PREFIX])
def test_tokens_carry_a_checksum(prefix: str) -> None:
    token = new_token(prefix)
    assert token.startswith(prefix) and len(token) == 4 + 43 + 6 and is_token(token)
    flipped = token[:10] + ("a" if token[10] != "a" else "b") + token[11:]
    assert not is_token(flipped) and not is_token(token[:-1]) and not is_token(token + "x")
    assert new_token(prefix) != token


@pytest.mark.parametrize("text", CODE)
def test_ordinary_code_is_never_redacted(text: str) -> None:
    redactor = Redactor()
    assert redactor.text(text) == (text, 0)
    assert redactor.binary(text.encode() + b" caf\xe9") == (text.encode() + b" caf\xe9", 0)


def test_token_shapes_and_known_values_are_redacted_in_text_and_bytes() -> None:
    redactor = Redactor()
    ours = new_token(API_KEY_PREFIX)
    github = "ghp_" + "".join(secrets.choice("abcXYZ0123") for _ in range(36))
    openrouter = "sk-or-v1-" + "0123456789abcdef" * 4
    redactor.add("deploy-secret-value", run_id="run_1")
    text = f"key={ours}\n{github} and {openrouter}; deploy-secret-value; crs_transform_x"
    assert redactor.text(text, "run_1") == (f"key={MARK}\n{MARK} and {MARK}; {MARK}; crs_transform_x", 4)
    assert redactor.text(text, "run_2")[1] == 3  # per-run values only for their run
    raw = b"caf\xe9 " + text.encode() + b" \xff"
    assert redactor.binary(raw, "run_1") == (
        b"caf\xe9 " + f"key={MARK}\n{MARK} and {MARK}; {MARK}; crs_transform_x".encode() + b" \xff", 4)
    # a token inside a longer word is not a token
    assert redactor.text("x" + ours)[1] == 0 and redactor.text(ours + "_suffix")[1] == 0
    # file names made of a token are redacted like any text
    assert redactor.data([f"{ours}.txt", "ok.py"]) == [f"{MARK}.txt", "ok.py"]
