"""Standard Webhooks signing (SPEC §3.2): the headers that let a receiver authenticate a delivery.

Owns the ``webhook-*`` headers and the ``webhook-signature`` value. The HMAC itself is the
``standardwebhooks`` package's, the library receivers verify with, so the two cannot drift apart.
Which secrets are active (the current one, plus the previous one for 24 h after a rotation) is
the caller's business; secrets never appear in an exception raised here.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from standardwebhooks import Webhook
from standardwebhooks.webhooks import EmptyWebhookSecretError

USER_AGENT = "Conclave-Webhooks/1.0"


def signature_header(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64>`` per distinct secret, space-separated, signing ``"{msg_id}.{timestamp}.{body}"``.

    Standard Webhooks receivers accept a delivery when any listed signature matches, so during a
    secret rotation a receiver holding either the old or the new secret verifies it. Secrets may
    carry the ``whsec_`` prefix or not. ``body`` must be UTF-8 (the reference verifier decodes it).
    """
    if not secrets:
        raise ValueError("at least one webhook secret is required to sign")
    signed_at = datetime.fromtimestamp(timestamp, tz=UTC)
    data = body.decode("utf-8")
    signatures = []
    for index, secret in enumerate(dict.fromkeys(secrets)):
        try:
            signer = Webhook(secret)
        except (ValueError, EmptyWebhookSecretError, RuntimeError):
            # ``from None``: a secret must not reach a log, not even through a chained exception.
            raise ValueError(f"webhook secret #{index} is not a valid base64 secret") from None
        signatures.append(signer.sign(msg_id, signed_at, data))
    return " ".join(signatures)


def webhook_headers(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Every header a delivery carries: ``webhook-id``/``-timestamp``/``-signature``, content type, agent.

    ``msg_id`` must stay the same across retries of one event, so receivers can deduplicate.
    """
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(secrets, msg_id, timestamp, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }
