"""Standard Webhooks signing, checked with the reference verifier receivers use (``standardwebhooks``)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time

import orjson
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from shared.webhooks.signing import signature_header, webhook_headers


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


BODY = orjson.dumps({"type": "batch.completed", "timestamp": "2026-01-01T00:00:00Z", "data": {"id": "b_1"}})


def test_a_receiver_with_the_secret_verifies_the_headers() -> None:
    secret = new_secret()
    headers = webhook_headers([secret], "msg_1", int(time.time()), BODY)
    assert Webhook(secret).verify(BODY, headers) == orjson.loads(BODY)


def test_during_rotation_a_receiver_with_either_secret_verifies() -> None:
    old, new = new_secret(), new_secret()
    headers = webhook_headers([old, new], "msg_2", int(time.time()), BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(BODY, headers)
    Webhook(new).verify(BODY, headers)


def test_a_wrong_secret_fails_verification() -> None:
    headers = webhook_headers([new_secret()], "msg_3", int(time.time()), BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)


def test_a_changed_body_fails_verification() -> None:
    secret = new_secret()
    headers = webhook_headers([secret], "msg_3", int(time.time()), BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace(b"b_1", b"b_2"), headers)


def test_headers_carry_the_given_id_and_timestamp() -> None:
    headers = webhook_headers([new_secret()], "msg_stable", 1_700_000_000, BODY)
    assert headers["webhook-id"] == "msg_stable"
    assert headers["webhook-timestamp"] == "1700000000"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "Conclave-Webhooks/1.0"
    assert set(headers) == {
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "content-type",
        "user-agent",
    }


def test_the_signature_matches_the_standard_webhooks_test_vector() -> None:
    # The vector published with the Standard Webhooks reference libraries.
    header = signature_header(
        ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert header == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_signature_is_hmac_sha256_of_id_timestamp_body_with_the_decoded_secret() -> None:
    key = os.urandom(32)
    secret = "whsec_" + base64.b64encode(key).decode()
    expected = hmac.new(key, b"msg_4.1700000000." + BODY, hashlib.sha256).digest()
    assert (
        signature_header([secret], "msg_4", 1_700_000_000, BODY)
        == "v1," + base64.b64encode(expected).decode()
    )
    # The prefix is optional, as in the reference library.
    assert signature_header([secret.removeprefix("whsec_")], "msg_4", 1_700_000_000, BODY) == (
        signature_header([secret], "msg_4", 1_700_000_000, BODY)
    )


def test_a_repeated_secret_is_signed_once() -> None:
    secret = new_secret()
    assert len(signature_header([secret, secret], "m", 1, BODY).split(" ")) == 1


def test_signing_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="at least one"):
        signature_header([], "m", 1, BODY)


@pytest.mark.parametrize("bad", ["whsec_X", "whsec_", "whsec_пароль"])
def test_a_bad_secret_is_an_error_that_does_not_show_the_secret(bad: str) -> None:
    with pytest.raises(ValueError, match="secret #1 is not a valid") as info:
        signature_header([new_secret(), bad], "m", 1, BODY)
    assert info.value.__cause__ is None and info.value.__suppress_context__
