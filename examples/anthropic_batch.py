"""An Anthropic Message Batches job, unchanged but for the base URL and the key, run by Conclave.

    conclave demo --serve          # in one shell; it prints the two exports below
    export CONCLAVE_API_URL=http://127.0.0.1:PORT CONCLAVE_API_KEY=cnk_...
    python examples/anthropic_batch.py

The SDK authenticates with ``x-api-key``, which Conclave accepts as it accepts ``Authorization:
Bearer``. ``params.model`` picks the work as in an OpenAI file: ``council``,
``council:<preset>`` or one model.
"""

from __future__ import annotations

import os
import time

from anthropic import Anthropic

client = Anthropic(base_url=os.environ["CONCLAVE_API_URL"], api_key=os.environ["CONCLAVE_API_KEY"])

batch = client.messages.batches.create(
    requests=[
        {
            "custom_id": "haiku-council",
            "params": {
                "model": "council",
                "max_tokens": 300,
                "system": "Answer briefly.",
                "messages": [{"role": "user", "content": "Write a haiku about distributed systems."}],
            },
        },
        {
            "custom_id": "fact-single",
            "params": {
                "model": "sim:gamma",
                "max_tokens": 100,
                "messages": [{"role": "user", "content": "How many moons does Mars have?"}],
            },
        },
    ]
)
print(f"message batch {batch.id}: {batch.processing_status}")
while batch.processing_status != "ended":
    time.sleep(1)
    batch = client.messages.batches.retrieve(batch.id)
    print(f"  {batch.processing_status}: {batch.request_counts}")

for result in client.messages.batches.results(batch.id):
    if result.result.type == "succeeded":
        text = "".join(block.text for block in result.result.message.content if block.type == "text")
        print(f"\n{result.custom_id} ({result.result.message.model}):\n{text}")
    else:
        print(f"\n{result.custom_id}: {result.result.type}")
