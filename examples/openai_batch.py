"""An OpenAI Batch API job, unchanged but for the base URL and the key, run by Conclave.

    conclave demo --serve          # in one shell; it prints the two exports below
    export CONCLAVE_API_URL=http://127.0.0.1:PORT CONCLAVE_API_KEY=cnk_...
    python examples/openai_batch.py

Each line's ``body.model`` picks its work: ``council`` (the configured council: answers,
reviews, synthesis), ``council:<preset>`` (a ``[councils.<preset>]`` table of providers.toml),
or one model (``sim:alpha`` on the demo's simulated provider) for a plain single-model request.
"""

from __future__ import annotations

import io
import json
import os
import time

from openai import OpenAI

client = OpenAI(base_url=os.environ["CONCLAVE_API_URL"] + "/v1", api_key=os.environ["CONCLAVE_API_KEY"])

questions = {
    "q-council": ("council", "Why do leaves change colour in autumn?"),
    "q-single": ("sim:alpha", "Name three prime numbers."),
    "q-single-2": ("sim:beta", "What is the capital of Australia?"),
}
lines = [
    {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 300},
    }
    for custom_id, (model, question) in questions.items()
]
jsonl = "".join(json.dumps(line) + "\n" for line in lines).encode()

input_file = client.files.create(file=("questions.jsonl", io.BytesIO(jsonl)), purpose="batch")
batch = client.batches.create(
    input_file_id=input_file.id, endpoint="/v1/chat/completions", completion_window="24h"
)
print(f"batch {batch.id}: {batch.status}")
while batch.status not in ("completed", "failed", "expired", "cancelled"):
    time.sleep(1)
    batch = client.batches.retrieve(batch.id)
    counts = batch.request_counts
    print(f"  {batch.status}: {counts.completed if counts else 0}/{counts.total if counts else 0}")

if batch.status == "failed":
    for error in batch.errors.data if batch.errors and batch.errors.data else []:
        print(f"line {error.line}: {error.param}: {error.message}")
    raise SystemExit(1)

assert batch.output_file_id is not None
for raw in client.files.content(batch.output_file_id).text.splitlines():
    line = json.loads(raw)
    body = line["response"]["body"]
    print(f"\n{line['custom_id']} ({body['model']}):\n{body['choices'][0]['message']['content']}")
    if "council" in body:
        ranking = ", ".join(f"{r['model']} {r['mean_rank']}" for r in body["council"]["aggregate_ranking"])
        print(f"  council synthesis: {body['council']['synthesis']}; ranking: {ranking}")
if batch.error_file_id:
    errors = client.files.content(batch.error_file_id).text.splitlines()
    print(f"\n{len(errors)} request(s) in the error file")
