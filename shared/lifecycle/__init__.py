"""The lifecycle of batches and queries: their statuses and every transition between them.

``statuses.py`` names the states (``StrEnum``); ``transitions.py`` holds the only functions that
change one, each a conditional UPDATE. Services (``shared/batches/service.py``), the worker
pipeline (``workers/pipeline.py``) and the scheduler's jobs (expiry, reconciliation) call them;
nothing else writes a status.

```
batch:  validating ─▶ in_progress ─▶ completed           (finalize_if_done: no query open)
             │             ├───────▶ cancelling ─▶ cancelled   (begin_cancel; finalize_if_done)
             │             └───────▶ expired               (expire_batch: window passed)
             └───────────────────▶ failed                  (the input could not be accepted)

query:  queued ─▶ running ─▶ succeeded | failed           (claim_queries; record_outcomes)
          ▲          │
          └──────────┘  hand_back (holder dead, lease past) · record_outcomes with requeue_at
        queued ─▶ cancelled (begin_cancel) · queued|running ─▶ expired (expire_batch)
```
"""
