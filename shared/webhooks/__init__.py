"""Outbound webhooks (SPEC §3.2).

    ssrf.py       which URLs and addresses a webhook may go to; URL parsing and DNS resolution
    signing.py    Standard Webhooks headers, one ``v1`` signature per active tenant secret
    delivery.py   one HTTP attempt to an address checked and pinned at send time → ``AttemptResult``
    events.py     events become delivery rows, committed with the change they report
    endpoints.py  tenant-facing management: endpoints, the signing secret and its rotation, deliveries

ssrf, signing and delivery do no database work and keep no schedule: retrying, recording attempts
and disabling endpoints are the scheduler's webhook job (``scheduler/jobs/webhooks.py``).
"""
