"""The official OpenAI Python SDK against Sluice, unchanged: models, a plain completion, the
same completion streamed (same text for the same seed), structured output with a JSON Schema,
and errors in OpenAI's shape.

Run by tests/it/openai.rs: `python openai_sdk.py BASE_URL API_KEY`. Prints one JSON line.
"""

import json
import sys

import openai
from openai import OpenAI

base, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)

models = client.models.list()
model = models.data[0].id
messages = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Say something about rivers."},
]

plain = client.chat.completions.create(
    model=model, messages=messages, max_tokens=24, temperature=0.8, seed=11
)
assert plain.object == "chat.completion", plain
text = plain.choices[0].message.content
assert plain.choices[0].message.role == "assistant"
assert plain.choices[0].finish_reason in ("stop", "length"), plain
assert plain.usage.completion_tokens > 0 and plain.usage.prompt_tokens > 0, plain.usage

stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=24,
    temperature=0.8,
    seed=11,
    stream=True,
    stream_options={"include_usage": True},
)
streamed, finish, usage, chunks = "", None, None, 0
for chunk in stream:
    chunks += 1
    assert chunk.object == "chat.completion.chunk", chunk
    if chunk.choices:
        streamed += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage
assert streamed == text, (streamed, text)
assert finish == plain.choices[0].finish_reason, finish
assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens, usage

schema = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["answer", "n"],
    "additionalProperties": False,
}
structured = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=80,
    temperature=0,
    response_format={
        "type": "json_schema",
        "json_schema": {"name": "verdict", "schema": schema, "strict": True},
    },
)
assert structured.choices[0].finish_reason == "stop", structured
verdict = json.loads(structured.choices[0].message.content)
assert set(verdict) == {"answer", "n"}, verdict
assert verdict["answer"] in ("yes", "no") and 0 <= verdict["n"] <= 9, verdict

errors = {}
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
except openai.NotFoundError as e:
    errors["model"] = e.code
try:
    client.chat.completions.create(model=model, messages=messages, n=2)
except openai.BadRequestError as e:
    errors["n"] = e.code
try:
    OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0).models.list()
except openai.AuthenticationError as e:
    errors["auth"] = e.code
assert errors == {
    "model": "model_not_found",
    "n": "unsupported_parameter",
    "auth": "unauthorized",
}, errors

print(json.dumps({"model": model, "text": text, "chunks": chunks, "verdict": verdict, "errors": errors}))
