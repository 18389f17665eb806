"""The official OpenAI Python SDK's Files and Batches calls against Sluice, unchanged: upload a
JSONL file, create a batch, poll it to completion, read its output file, and cancel a second
batch.

Run by tests/it/batches.rs: `python openai_batches.py BASE_URL API_KEY`. Prints one JSON line.
"""

import io
import json
import sys
import time

from openai import OpenAI

base, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)
model = client.models.list().data[0].id


def jsonl(prefix, n, max_tokens):
    lines = [
        json.dumps(
            {
                "custom_id": f"{prefix}-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": model,
                    "messages": [{"role": "user", "content": f"Say {i}."}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                },
            }
        )
        for i in range(n)
    ]
    return io.BytesIO("\n".join(lines).encode())


def wait(batch_id, done, seconds=150):
    deadline = time.time() + seconds
    while time.time() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in done:
            return batch
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} did not reach {done}: {batch}")


uploaded = client.files.create(file=("in.jsonl", jsonl("sdk", 3, 4)), purpose="batch")
assert uploaded.purpose == "batch" and uploaded.bytes > 0, uploaded
assert client.files.retrieve(uploaded.id).id == uploaded.id

batch = client.batches.create(
    input_file_id=uploaded.id,
    endpoint="/v1/chat/completions",
    completion_window="24h",
    metadata={"purpose": "sdk-test"},
)
assert batch.status == "validating", batch
batch = wait(batch.id, ("completed", "failed"))
assert batch.status == "completed", batch
assert batch.request_counts.total == 3 and batch.request_counts.completed == 3, batch
output = client.files.content(batch.output_file_id).text
results = {}
for line in output.splitlines():
    record = json.loads(line)
    assert record["response"]["status_code"] == 200, record
    results[record["custom_id"]] = record["response"]["body"]["choices"][0]["message"]["content"]
assert sorted(results) == ["sdk-0", "sdk-1", "sdk-2"], results
listed = client.batches.list(limit=10)
assert any(b.id == batch.id for b in listed.data), listed

long = client.files.create(file=("long.jsonl", jsonl("long", 8, 200)), purpose="batch")
second = client.batches.create(
    input_file_id=long.id, endpoint="/v1/chat/completions", completion_window="1h"
)
cancelling = client.batches.cancel(second.id)
assert cancelling.status in ("cancelling", "cancelled"), cancelling
cancelled = wait(second.id, ("cancelled",))
counts = cancelled.request_counts
assert counts.total == 8 and counts.completed + counts.failed == 8, cancelled

print(
    json.dumps(
        {
            "completed": batch.request_counts.completed,
            "cancelled_status": cancelled.status,
            "cancelled_counts": [counts.completed, counts.failed],
        }
    )
)
