"""Contract test: turbine behind LiteLLM, the multi-provider gateway library, as a team that
already calls a hosted image API through a gateway would add it: as a provider of its own
(`openai/<model>` with an `api_base`), and as the fallback tier that takes the traffic a
rate-limited hosted API refuses.

Run by scripts/test_openai_sdk.sh against the server it started (tiny model, CPU, 64x64), with a
plain key and one limited to 1 request per minute of its own. The "hosted API" is a local stand-in
that refuses every request the way OpenAI does when a rate limit is hit (429, `Retry-After`, the
error body); nothing here reaches the network (the model cost map is LiteLLM's bundled copy).
"""

import argparse
import asyncio
import base64
import importlib.metadata
import io
import json
import os
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Before litellm is imported: its bundled cost map, not a fetch from GitHub at import.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm

from contract_support import png_size, rgba_png, run


def images_of(resp) -> list[bytes]:
    """The decoded images of a LiteLLM ImageResponse, each checked to be a 64x64 PNG."""
    out = []
    for image in resp.data:
        data = base64.b64decode(image.b64_json)
        assert png_size(data) == (64, 64), png_size(data)
        out.append(data)
    return out


class HostedStandIn:
    """A hosted image API over its rate limit: every POST gets OpenAI's 429, with Retry-After.
    Counts the requests it refused, so a test can tell the gateway did try it first."""

    def __init__(self):
        self.refused = 0
        lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                with lock:
                    stand_in.refused += 1
                body = json.dumps(
                    {
                        "error": {
                            "message": "Rate limit reached for gpt-image-1 on images per minute",
                            "type": "requests",
                            "param": None,
                            "code": "rate_limit_exceeded",
                        }
                    }
                ).encode()
                self.send_response(429)
                self.send_header("content-type", "application/json")
                self.send_header("retry-after", "20")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/v1"


def refusals_of(base_url: str, api_key: str) -> int:
    """turbine's count of generations answered 429, from /metrics."""
    root = base_url.removesuffix("/v1")
    req = urllib.request.Request(f"{root}/metrics", headers={"Authorization": f"Bearer {api_key}"})
    text = urllib.request.urlopen(req, timeout=30).read().decode()
    for line in text.splitlines():
        if line.startswith('turbine_http_requests_total{route="/v1/images/generations",status="429"}'):
            return int(float(line.split()[-1]))
    return 0


def two_tiers(first, then) -> litellm.Router:
    """A router whose model group `first` falls back to `then`, each (group name, LiteLLM model,
    api_base, api_key); no retries anywhere (not even the OpenAI SDK's own, which would wait out
    a `Retry-After`), so a refusal moves on at once."""
    return litellm.Router(
        model_list=[
            {
                "model_name": name,
                "litellm_params": {"model": model, "api_base": base, "api_key": key, "max_retries": 0},
            }
            for name, model, base, key in (first, then)
        ],
        fallbacks=[{first[0]: [then[0]]}],
        num_retries=0,
    )


def test_provider(base_url: str, api_key: str):
    # turbine as one more OpenAI-compatible provider: the model is "openai/<served name>".
    kw = dict(model="openai/sdxl-turbo", api_base=base_url, api_key=api_key, max_retries=0)
    first = litellm.image_generation(
        prompt="a red fox in snow", size="64x64", n=2, extra_body={"seed": 5}, **kw
    )
    a = images_of(first)
    assert len(a) == 2 and a[0] != a[1]
    # Usage goes through the gateway's accounting: one output token per 8x8 patch, per image.
    assert first.usage.completion_tokens == 2 * 64, first.usage
    assert first.usage.prompt_tokens > 0, first.usage
    # The seed extension passes through as the SDK's extra_body: same seed, same images.
    again = images_of(
        litellm.image_generation(prompt="a red fox in snow", size="64x64", n=2, extra_body={"seed": 5}, **kw)
    )
    assert again == a
    # Image i of a request has seed + i: seed 6 alone is the second image above, seed 7 neither.
    second = images_of(
        litellm.image_generation(prompt="a red fox in snow", size="64x64", extra_body={"seed": 6}, **kw)
    )
    assert second == a[1:]
    other = images_of(
        litellm.image_generation(prompt="a red fox in snow", size="64x64", extra_body={"seed": 7}, **kw)
    )
    assert other[0] not in a
    # A client written for OpenAI's models: their name (an alias here) and quality.
    resp = litellm.image_generation(
        model="openai/gpt-image-1",
        api_base=base_url,
        api_key=api_key,
        max_retries=0,
        prompt="a lighthouse",
        quality="medium",
    )
    assert resp.quality == "medium" and resp.size == "64x64", (resp.quality, resp.size)
    assert len(images_of(resp)) == 1


def test_azure_provider(base_url: str, api_key: str):
    # turbine behind a gateway's Azure OpenAI provider ("azure/<deployment>"): the routes and the
    # api-key header Azure's clients use. A DALL·E deployment answers with a URL, as Azure's does.
    endpoint = base_url.removesuffix("/").removesuffix("/v1")
    kw = dict(api_base=endpoint, api_key=api_key, api_version="2024-10-21", max_retries=0)
    resp = litellm.image_generation(model="azure/dall-e-3", prompt="a red fox in snow", **kw)
    assert resp.data[0].url and "/v1/images/files/" in resp.data[0].url, resp.data[0]
    resp = litellm.image_generation(
        model="azure/gpt-image-1", prompt="a red fox in snow", extra_body={"seed": 5}, **kw
    )
    (azure,) = images_of(resp)
    # The same image as through the OpenAI provider.
    same = litellm.image_generation(
        model="openai/sdxl-turbo",
        api_base=base_url,
        api_key=api_key,
        max_retries=0,
        prompt="a red fox in snow",
        extra_body={"seed": 5},
    )
    assert images_of(same) == [azure]


def test_edit(base_url: str, api_key: str):
    # LiteLLM builds its own multipart form for edits: the image and a mask whose transparent
    # half is what to repaint.
    image = rgba_png(64, 64, lambda x, y: (4 * x, 4 * y, 128, 255))
    mask = rgba_png(64, 64, lambda x, y: (0, 0, 0, 0 if x < 32 else 255))
    kw = dict(model="openai/gpt-image-1", api_base=base_url, api_key=api_key, max_retries=0, prompt="a cat")

    def edit(seed):
        resp = litellm.image_edit(
            image=io.BytesIO(image), mask=io.BytesIO(mask), size="64x64", extra_body={"seed": seed}, **kw
        )
        return images_of(resp)

    a = edit(3)
    assert len(a) == 1
    assert edit(3) == a
    assert edit(4) != a


def test_errors(base_url: str, api_key: str, limited_key: str):
    # What a gateway decides by: the exception class its callers and its router see.
    kw = dict(prompt="a fox", size="64x64", max_retries=0)

    def raises(exc_type, **call):
        try:
            litellm.image_generation(**{**kw, **call})
        except exc_type as e:
            return e
        raise AssertionError(f"{exc_type.__name__} not raised")

    e = raises(
        litellm.BadRequestError, model="openai/sdxl-turbo", api_base=base_url, api_key=api_key, size="65x64"
    )
    assert e.status_code == 400 and "65x64" in str(e), e
    e = raises(
        litellm.AuthenticationError, model="openai/sdxl-turbo", api_base=base_url, api_key="sk-not-a-key"
    )
    assert e.status_code == 401, e
    e = raises(litellm.NotFoundError, model="openai/flux-dev", api_base=base_url, api_key=api_key)
    assert e.status_code == 404 and "flux-dev" in str(e), e
    # The limited key's first request passes, its second is refused with the time to wait.
    litellm.image_generation(model="openai/sdxl-turbo", api_base=base_url, api_key=limited_key, **kw)
    e = raises(litellm.RateLimitError, model="openai/sdxl-turbo", api_base=base_url, api_key=limited_key)
    assert e.status_code == 429, e
    retry_after = int(e.response.headers["retry-after"])
    assert 1 <= retry_after <= 60, retry_after


def test_fallback_tier(base_url: str, api_key: str):
    # The deployment the brief describes: a hosted API first, turbine behind it. The hosted one
    # refuses (rate limit), the router falls back, the caller gets turbine's images.
    hosted = HostedStandIn()
    router = two_tiers(
        ("images", "openai/gpt-image-1", hosted.base_url, "sk-hosted"),
        ("turbine", "openai/sdxl-turbo", base_url, api_key),
    )
    try:
        resp = router.image_generation(model="images", prompt="a product photo of a mug", size="64x64", n=2)
        assert len(images_of(resp)) == 2
        assert hosted.refused == 1, hosted.refused

        # A burst, as when the hosted API's limit is hit under load: every request lands on
        # turbine, concurrently, and none is lost or mixed up with another.
        async def burst():
            return await asyncio.gather(
                *[
                    router.aimage_generation(model="images", prompt=f"a mug, variant {i}", size="64x64")
                    for i in range(8)
                ]
            )

        resps = asyncio.run(burst())
        images = [images_of(r)[0] for r in resps]
        assert len(set(images)) == 8
        assert hosted.refused == 9, hosted.refused
    finally:
        hosted.server.shutdown()


def test_turbine_first(base_url: str, api_key: str, limited_key: str):
    # turbine first: its own 429 (here a key's request limit; a full queue answers the same
    # way) moves the router to the next tier, and the caller still gets images.
    router = two_tiers(
        ("turbine-first", "openai/sdxl-turbo", base_url, limited_key),
        ("next-tier", "openai/sdxl-turbo", base_url, api_key),
    )
    before = refusals_of(base_url, api_key)
    resp = router.image_generation(
        model="turbine-first", prompt="a lamp", size="64x64", extra_body={"seed": 9}
    )
    assert len(images_of(resp)) == 1
    # The limited key was spent by test_errors within the minute: refused once, then the
    # fallback answered. Same seed through either tier, same image.
    assert refusals_of(base_url, api_key) == before + 1
    direct = litellm.image_generation(
        model="openai/sdxl-turbo",
        api_base=base_url,
        api_key=api_key,
        max_retries=0,
        prompt="a lamp",
        size="64x64",
        extra_body={"seed": 9},
    )
    assert images_of(direct) == images_of(resp)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument(
        "--limited-key", required=True, help="a key limited to 1 request per minute, unused before"
    )
    args = ap.parse_args()
    litellm.suppress_debug_info = True
    tests = [
        ("provider", lambda: test_provider(args.base_url, args.api_key)),
        ("edit", lambda: test_edit(args.base_url, args.api_key)),
        ("azure provider", lambda: test_azure_provider(args.base_url, args.api_key)),
        ("errors", lambda: test_errors(args.base_url, args.api_key, args.limited_key)),
        ("fallback tier", lambda: test_fallback_tier(args.base_url, args.api_key)),
        ("turbine first", lambda: test_turbine_first(args.base_url, args.api_key, args.limited_key)),
    ]
    return run(tests, f"litellm {importlib.metadata.version('litellm')}")


if __name__ == "__main__":
    sys.exit(main())
