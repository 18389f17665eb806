"""A streaming chat client for serving benchmarks: OpenAI `/v1/chat/completions` with
`stream: true`, N concurrent clients, the same prompts for every server.

    python client.py --base-url URL --api-key KEY --model NAME [--concurrency 1,4,8]
                     [--requests 16] [--max-tokens 128] [--system-tokens 0] [--label NAME]

Per request it records the time to the first content chunk (TTFT), the time per output token
after the first (TPOT: decode time over the tokens after the first, which does not depend on
how a server groups tokens into chunks), and the tokens generated (from the final usage chunk
when the server sends one, else the content chunks). Per concurrency level it prints one JSON
line: requests, errors, output tokens per second over the level's wall time, TTFT and TPOT p50
and p99.
"""

import argparse
import asyncio
import json
import statistics
import time

from openai import AsyncOpenAI

TOPICS = [
    "the history of lighthouses",
    "how bridges are designed",
    "the water cycle",
    "the invention of the printing press",
    "how compilers work",
    "the migration of birds",
    "the economics of railways",
    "the chemistry of baking bread",
    "the geology of volcanoes",
    "the architecture of medieval cathedrals",
    "how vaccines train the immune system",
    "the mathematics of music",
    "the life cycle of stars",
    "the origins of chess",
    "how cities manage traffic",
    "the ecology of coral reefs",
]

# A fixed, ordinary system prompt, repeated to the requested length (19 tokens a line with the Qwen2.5 tokenizer):
# what a tenant's shared instructions look like to a prefix cache.
SYSTEM_LINE = "You are a careful assistant for a library; answer clearly, cite no sources, stay polite. "


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


async def one(client, model, prompt, system, max_tokens, seed):
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    start = time.perf_counter()
    first = None
    last = None
    chunks = 0
    usage = None
    stream = await client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices or []:
            if choice.delta and choice.delta.content:
                now = time.perf_counter()
                if first is None:
                    first = now
                last = now
                chunks += 1
    tokens = usage.completion_tokens if usage is not None else chunks
    if first is None:
        raise RuntimeError("no content")
    ttft = first - start
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return ttft, tpot, tokens


async def level(client, model, concurrency, requests, max_tokens, system):
    queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    ttfts, tpots, tokens, errors = [], [], [], []

    async def worker():
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            prompt = f"Write a long, detailed essay about {TOPICS[i % len(TOPICS)]}."
            try:
                ttft, tpot, n = await one(client, model, prompt, system, max_tokens, 1000 + i)
                ttfts.append(ttft)
                if tpot is not None:
                    tpots.append(tpot)
                tokens.append(n)
            except Exception as e:  # noqa: BLE001 - counted and reported, the run goes on
                errors.append(repr(e)[:200])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    return {
        "concurrency": concurrency,
        "requests": requests,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "output_tokens": sum(tokens),
        "wall_s": round(wall, 2),
        "tokens_per_s": round(sum(tokens) / wall, 1) if wall > 0 else None,
        "ttft_p50_ms": ms(percentile(ttfts, 50)),
        "ttft_p99_ms": ms(percentile(ttfts, 99)),
        "tpot_p50_ms": ms(percentile(tpots, 50)),
        "tpot_p99_ms": ms(percentile(tpots, 99)),
        "mean_tokens": round(statistics.mean(tokens), 1) if tokens else None,
    }


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--api-key", default="none")
    p.add_argument("--model", help="default: the first model GET /v1/models lists")
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--system-tokens", type=int, default=0)
    p.add_argument("--label", default="")
    a = p.parse_args()
    system = SYSTEM_LINE * max(0, a.system_tokens // 19) if a.system_tokens else ""
    client = AsyncOpenAI(base_url=a.base_url, api_key=a.api_key, timeout=600, max_retries=0)
    if not a.model:
        a.model = (await client.models.list()).data[0].id
    # One warm-up request (weights paged in, first-use allocations), not counted.
    await one(client, a.model, "Say hello.", system, 8, 1)
    for c in [int(x) for x in a.concurrency.split(",") if x]:
        result = await level(client, a.model, c, max(a.requests, c), a.max_tokens, system)
        result["server"] = a.label
        result["system_tokens"] = a.system_tokens
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
