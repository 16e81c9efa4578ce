"""The openai Python SDK as a real streaming client, driven by
tests/streaming.rs: it asks for a chat completion with stream=True through
idemproxy, with an Idempotency-Key of its own, and prints one JSON line as
soon as each part arrives: the Idempotent-Replayed header, every token,
then {"done": true}.

Usage: python3 tests/openai_stream.py BASE_URL IDEMPOTENCY_KEY
"""

import json
import sys

from openai import OpenAI


def say(obj):
    print(json.dumps(obj), flush=True)


def main():
    base_url, key = sys.argv[1], sys.argv[2]
    # max_retries=0: the test decides when to retry, with the same key.
    client = OpenAI(base_url=base_url, api_key="test-key", max_retries=0, timeout=30)
    raw = client.chat.completions.with_raw_response.create(
        model="fake-model",
        messages=[{"role": "user", "content": "Say hello"}],
        stream=True,
        extra_headers={"Idempotency-Key": key},
        extra_query={"gated": "1"},
    )
    say({"replayed": raw.headers.get("idempotent-replayed")})
    for chunk in raw.parse():
        for choice in chunk.choices:
            if choice.delta.content:
                say({"token": choice.delta.content})
    say({"done": True})


if __name__ == "__main__":
    main()
