"""Contract test: the official `openai` Python SDK against a running `turbine serve`.

Run by scripts/test_openai_sdk.sh, which starts the server (tiny model, CPU, 64x64 default size)
with two API keys: a plain one and one limited to 1 request per minute; then again over HTTPS,
with a certificate from a private CA (`--ca-file`, given to the SDK as users give it) and the
tests that touch the transport (`--only`).
"""

import argparse
import base64
import ssl
import sys
import typing
import urllib.request
import warnings

import openai
from openai import OpenAI
from openai.types import ImageModel

from contract_support import mask_png, png_size, run

# With --ca-file: what verifies the server's certificate (the SDK's client and plain fetches).
SSL_CONTEXT: typing.Optional[ssl.SSLContext] = None


def seed_of(image) -> int:
    """The `seed` extension field on an image (kept by the SDK's models as an extra field)."""
    return image.model_extra["seed"]


def test_b64_json(client: OpenAI):
    resp = client.images.generate(
        model="sdxl-turbo",
        prompt="a watercolor fox",
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 11},
    )
    assert resp.created > 0
    assert resp.size == "64x64"
    assert resp.output_format == "png"
    assert resp.quality == "low"
    assert resp.background == "opaque"
    assert resp.usage is not None and resp.usage.output_tokens == 64
    assert resp.usage.input_tokens == resp.usage.input_tokens_details.text_tokens > 0
    assert len(resp.data) == 1
    image = resp.data[0]
    assert image.url is None and image.revised_prompt is None
    assert seed_of(image) == 11
    assert png_size(base64.b64decode(image.b64_json)) == (64, 64)


def test_openai_model_alias_and_defaults(client: OpenAI):
    # A client written for OpenAI: model name of theirs, default size ("auto" = 64x64 here).
    resp = client.images.generate(model="gpt-image-1", prompt="a lighthouse", quality="high")
    assert resp.quality == "high"
    assert png_size(base64.b64decode(resp.data[0].b64_json)) == (64, 64)


def test_url_then_fetch(client: OpenAI):
    resp = client.images.generate(
        model="dall-e-3", prompt="a red bicycle", response_format="url", output_format="jpeg"
    )
    url = resp.data[0].url
    assert url and "/v1/images/files/" in url and resp.data[0].b64_json is None
    # On this server, in the scheme the client used.
    origin = str(client.base_url).removesuffix("/").removesuffix("/v1")
    assert url.startswith(origin + "/v1/images/files/"), (url, origin)
    # Fetched like a browser would: no API key, the id is the secret.
    with urllib.request.urlopen(url, timeout=60, context=SSL_CONTEXT) as fetched:
        assert fetched.status == 200
        assert fetched.headers["content-type"] == "image/jpeg"
        assert fetched.read()[:3] == b"\xff\xd8\xff", "not a JPEG"


def test_dall_e_quickstart_reads_url(client: OpenAI):
    # OpenAI's DALL·E quickstart (and LangChain's DallEAPIWrapper): no response_format, then
    # `data[0].url`, OpenAI's default for the DALL·E models. It used to be None here.
    resp = client.images.generate(model="dall-e-3", prompt="a white siamese cat", n=1)
    url = resp.data[0].url
    assert url and resp.data[0].b64_json is None, resp.data[0]
    with urllib.request.urlopen(url, timeout=60, context=SSL_CONTEXT) as fetched:
        assert png_size(fetched.read()) == (64, 64)
    # The GPT image models keep their base64.
    resp = client.images.generate(model="gpt-image-1", prompt="a white siamese cat")
    assert resp.data[0].url is None and resp.data[0].b64_json


def test_azure_openai_client(base_url: str, api_key: str, http_client):
    # Code written for Azure OpenAI's image deployments: AzureOpenAI posts to
    # /openai/deployments/{model}/images/... with the key as `api-key`.
    from openai import AzureOpenAI

    endpoint = base_url.removesuffix("/").removesuffix("/v1")
    az = AzureOpenAI(
        azure_endpoint=endpoint, api_key=api_key, api_version="2024-10-21", max_retries=0, http_client=http_client
    )
    resp = az.images.generate(model="dall-e-3", prompt="a white siamese cat", n=1)
    with urllib.request.urlopen(resp.data[0].url, timeout=60, context=SSL_CONTEXT) as fetched:
        assert png_size(fetched.read()) == (64, 64)
    resp = az.images.generate(model="gpt-image-1", prompt="a white siamese cat", extra_body={"seed": 9})
    made = base64.b64decode(resp.data[0].b64_json)
    resp = az.images.edit(model="gpt-image-1", image=("cat.png", made, "image/png"), prompt="at night", size="64x64")
    assert png_size(base64.b64decode(resp.data[0].b64_json)) == (64, 64)
    bad = AzureOpenAI(
        azure_endpoint=endpoint, api_key="sk-wrong", api_version="2024-10-21", max_retries=0, http_client=http_client
    )
    expect(openai.AuthenticationError, lambda: bad.images.generate(model="dall-e-3", prompt="x"), code="invalid_api_key")
    expect(openai.NotFoundError, lambda: az.images.generate(model="my-sdxl", prompt="x"), code="model_not_found")


def test_n3_seeded_distinct_and_reproducible(client: OpenAI):
    def run():
        return client.images.generate(prompt="three moons", n=3, extra_body={"seed": 500})

    first = run()
    assert [seed_of(d) for d in first.data] == [500, 501, 502]
    blobs = [base64.b64decode(d.b64_json) for d in first.data]
    assert len(set(blobs)) == 3, "the three images must differ"
    again = [base64.b64decode(d.b64_json) for d in run().data]
    assert again == blobs, "same prompt and seed must reproduce the images"
    alone = client.images.generate(prompt="three moons", extra_body={"seed": 502})
    assert base64.b64decode(alone.data[0].b64_json) == blobs[2]


def test_stream(client: OpenAI):
    # The SDK's image streaming (`stream=True`): one completed event per image, no partial
    # images at one step (SDXL-Turbo's default has none to show), the same images as without
    # streaming.
    plain = client.images.generate(prompt="a streamed lighthouse", n=2, size="64x64", extra_body={"seed": 21})
    stream = client.images.generate(
        prompt="a streamed lighthouse", n=2, size="64x64", stream=True, partial_images=1, extra_body={"seed": 21}
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.completed"] * 2, events
    by_seed = {seed_of(e): e for e in events}
    assert sorted(by_seed) == [21, 22]
    for i, seed in enumerate([21, 22]):
        e = by_seed[seed]
        assert (e.size, e.output_format, e.quality, e.background) == ("64x64", "png", "low", "opaque")
        assert e.created_at > 0
        assert e.usage.output_tokens == 64 and e.usage.input_tokens > 0
        assert base64.b64decode(e.b64_json) == base64.b64decode(plain.data[i].b64_json)

    # Four steps (quality high): the previews asked for come first, as the SDK's partial image
    # events; the first is the one-step image of the same seed (the first step's estimate).
    events = list(
        client.images.generate(
            prompt="a streamed lighthouse", size="64x64", stream=True, partial_images=2, quality="high",
            extra_body={"seed": 21},
        )
    )
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all((e.size, e.quality, e.output_format) == ("64x64", "high", "png") for e in events)
    assert base64.b64decode(events[0].b64_json) == base64.b64decode(plain.data[0].b64_json)
    assert events[1].b64_json != events[2].b64_json


def test_edit(client: OpenAI):
    # images.edit: the SDK's multipart upload of a PNG (one the server made), the extensions
    # (seed, strength) as form fields through extra_body, the generation response shape back.
    source = base64.b64decode(
        client.images.generate(prompt="a harbour", size="64x64", extra_body={"seed": 30}).data[0].b64_json
    )

    def edit(**kw):
        return client.images.edit(
            image=("harbour.png", source, "image/png"),
            prompt="the harbour at night",
            size="64x64",
            **kw,
        )

    resp = edit(model="gpt-image-1", n=2, extra_body={"seed": 31, "strength": 0.5})
    assert (resp.size, resp.output_format, resp.quality) == ("64x64", "png", "low")
    assert [seed_of(d) for d in resp.data] == [31, 32]
    # The input image is counted like the output: one token per 8x8 patch, per image made.
    assert resp.usage.input_tokens_details.image_tokens == 128 == resp.usage.output_tokens
    outputs = [base64.b64decode(d.b64_json) for d in resp.data]
    assert all(png_size(o) == (64, 64) for o in outputs)
    assert outputs[0] != outputs[1] and source not in outputs
    again = edit(extra_body={"seed": 31, "strength": 0.5})
    assert base64.b64decode(again.data[0].b64_json) == outputs[0], "seeded edits reproduce"

    events = list(edit(n=2, stream=True, extra_body={"seed": 31}))
    assert [e.type for e in events] == ["image_edit.completed"] * 2, events
    for e in events:
        assert base64.b64decode(e.b64_json) == outputs[seed_of(e) - 31]

    # A mask: its transparent square is repainted, the opaque rest kept.
    mask = mask_png(64, 64, lambda x, y: 0 if 16 <= x < 48 and 16 <= y < 48 else 255)
    masked = edit(mask=("mask.png", mask, "image/png"), extra_body={"seed": 31, "strength": 0.5})
    masked_png = base64.b64decode(masked.data[0].b64_json)
    assert png_size(masked_png) == (64, 64) and masked_png != outputs[0]
    # A mask must say what to keep with its alpha channel.
    expect(
        openai.BadRequestError,
        lambda: edit(mask=("mask.png", source, "image/png")),
        param="mask",
        code="invalid_image",
    )
    expect(openai.BadRequestError, lambda: edit(extra_body={"strength": 2}), param="strength")

    # GPT Image 2.5's edit: a markup laid over the image (opaque bar, transparent elsewhere),
    # quality xhigh, a safety identifier echoed back.
    markup = mask_png(64, 64, lambda x, y: 255 if 24 <= x < 40 else 0)
    marked = edit(
        model="gpt-image-2.5-flare",
        markup=("markup.png", markup, "image/png"),
        quality="xhigh",
        complexity="low",
        safety_identifier="user-42",
        extra_body={"seed": 31},
    )
    assert (marked.quality, marked.safety_identifier) == ("xhigh", "user-42")
    unmarked = edit(model="gpt-image-2.5-flare", quality="xhigh", extra_body={"seed": 31})
    assert base64.b64decode(marked.data[0].b64_json) != base64.b64decode(unmarked.data[0].b64_json)
    expect(
        openai.BadRequestError,
        lambda: edit(mask=("mask.png", mask, "image/png"), markup=("markup.png", markup, "image/png")),
        param="markup",
    )


def test_models(client: OpenAI):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "sdxl-turbo" and "dall-e-3" in ids, ids
    assert client.models.retrieve("sdxl-turbo").owned_by == "turbine"
    # Every image model name of this SDK means the served model (gpt-image-* is a prefix alias).
    for name in typing.get_args(ImageModel):
        assert client.models.retrieve(name).id == name, name
    resp = client.images.generate(model="gpt-image-2.6-sunburst", prompt="a kite", quality="max", size="64x64")
    assert resp.quality == "max"


def test_retired_variations(client: OpenAI):
    # OpenAI retired images.create_variation; the server says what to use instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the SDK marks the method deprecated
        e = expect(openai.NotFoundError, lambda: client.images.create_variation(image=("a.png", b"x", "image/png")))
    assert "/v1/images/edits" in e.body["message"], e.body


def expect(exc_type, fn, param=None, code=None):
    try:
        fn()
    except exc_type as e:
        err = e.body if isinstance(e.body, dict) else {}
        if param is not None:
            assert err.get("param") == param, (err, param)
        if code is not None:
            assert err.get("code") == code, (err, code)
        return e
    raise AssertionError(f"expected {exc_type.__name__}")


def test_bad_request(client: OpenAI):
    expect(openai.BadRequestError, lambda: client.images.generate(prompt="x", n=11), param="n")
    expect(openai.BadRequestError, lambda: client.images.generate(prompt="x", size="abc"), param="size")
    expect(
        openai.BadRequestError,
        lambda: client.images.generate(prompt="x", background="transparent"),
        param="background",
    )
    expect(openai.BadRequestError, lambda: client.images.generate(prompt=""), param="prompt")


def test_authentication(base_url: str):
    bad = OpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0)
    expect(openai.AuthenticationError, lambda: bad.images.generate(prompt="x"), code="invalid_api_key")


def test_not_found(client: OpenAI):
    expect(
        openai.NotFoundError,
        lambda: client.images.generate(model="no-such-model", prompt="x"),
        param="model",
        code="model_not_found",
    )


def test_rate_limit(base_url: str, limited_key: str):
    limited = OpenAI(base_url=base_url, api_key=limited_key, max_retries=0)
    raw = limited.images.with_raw_response.generate(prompt="first of the minute")
    assert raw.headers["x-ratelimit-limit-requests"] == "1"
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    e = expect(
        openai.RateLimitError,
        lambda: limited.images.generate(prompt="second"),
        code="rate_limit_exceeded",
    )
    assert int(e.response.headers["retry-after"]) >= 1


def wait_for_batch(client: OpenAI, batch):
    """Polls `batch` until it ends (a hang guard of five minutes, not a timing check)."""
    import time

    deadline = time.monotonic() + 300
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, f"the batch never ended: {batch}"
        time.sleep(0.05)
        batch = client.batches.retrieve(batch.id)
    return batch


def test_batch(client: OpenAI):
    """The Batch API as OpenAI's batch guide uses it: upload JSONL, create, poll, read."""
    import json

    lines = [
        {
            "custom_id": f"lighthouse-{i}",
            "method": "POST",
            "url": "/v1/images/generations",
            "body": {"model": "gpt-image-1", "prompt": f"a lighthouse, study {i}", "size": "64x64", "seed": 700 + i},
        }
        for i in range(3)
    ]
    lines.append({"custom_id": "too-big", "method": "POST", "url": "/v1/images/generations",
                  "body": {"prompt": "x", "n": 11}})
    data = "\n".join(json.dumps(line) for line in lines).encode()
    uploaded = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(data) and uploaded.status == "processed"
    assert uploaded.filename == "requests.jsonl"
    assert client.files.retrieve(uploaded.id).id == uploaded.id

    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/images/generations",
        completion_window="24h",
        metadata={"job": "sdk"},
    )
    assert batch.status == "validating" and batch.metadata == {"job": "sdk"}
    batch = wait_for_batch(client, batch)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 4
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 1)
    assert batch.usage is not None and batch.usage.output_tokens == 3 * 64

    results = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in results) == ["lighthouse-0", "lighthouse-1", "lighthouse-2"]
    for r in results:
        assert r["response"]["status_code"] == 200
        resp = openai.types.ImagesResponse.model_validate(r["response"]["body"])
        i = int(r["custom_id"].rsplit("-", 1)[1])
        assert seed_of(resp.data[0]) == 700 + i
        assert png_size(base64.b64decode(resp.data[0].b64_json)) == (64, 64)
    errors = [json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()]
    assert [e["custom_id"] for e in errors] == ["too-big"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "n"

    assert batch.id in [b.id for b in client.batches.list(limit=5)]
    outputs = [f.id for f in client.files.list(purpose="batch_output")]
    assert batch.output_file_id in outputs and batch.error_file_id in outputs
    assert client.files.delete(uploaded.id).deleted
    expect(openai.NotFoundError, lambda: client.files.retrieve(uploaded.id))
    expect(openai.BadRequestError, lambda: client.batches.cancel(batch.id))


def test_upload_in_parts(client: OpenAI):
    """A batch's input sent through the Uploads API as the SDK's `upload_file_chunked` sends a
    large file (here in parts of 100 bytes, with its MD5), then run as a batch; and an upload
    made part by part by hand, then cancelled."""
    import hashlib
    import json

    lines = [
        {
            "custom_id": f"part-{i}",
            "method": "POST",
            "url": "/v1/images/generations",
            "body": {"prompt": f"a harbour, study {i}", "size": "64x64", "seed": 900 + i},
        }
        for i in range(2)
    ]
    data = "\n".join(json.dumps(line) for line in lines).encode()
    assert len(data) > 200, "more than two parts"
    upload = client.uploads.upload_file_chunked(
        file=data,
        filename="big.jsonl",
        bytes=len(data),
        mime_type="text/jsonl",
        purpose="batch",
        part_size=100,
        md5=hashlib.md5(data).hexdigest(),
    )
    assert upload.status == "completed" and upload.file is not None, upload
    assert (upload.file.bytes, upload.file.purpose, upload.file.filename) == (len(data), "batch", "big.jsonl")
    assert client.files.content(upload.file.id).content == data

    batch = client.batches.create(
        input_file_id=upload.file.id, endpoint="/v1/images/generations", completion_window="24h"
    )
    batch = wait_for_batch(client, batch)
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 0)

    pending = client.uploads.create(bytes=10, filename="x.png", mime_type="image/png", purpose="vision")
    assert pending.status == "pending" and pending.expires_at == pending.created_at + 3600
    part = client.uploads.parts.create(pending.id, data=b"12345")
    assert part.upload_id == pending.id and part.id.startswith("part_")
    expect(openai.BadRequestError, lambda: client.uploads.complete(pending.id, part_ids=[part.id]))
    assert client.uploads.cancel(pending.id).status == "cancelled"
    expect(openai.BadRequestError, lambda: client.uploads.parts.create(pending.id, data=b"x"))


def test_webhooks(client: OpenAI):
    """Webhook endpoints as the SDK manages them, and a batch's end delivered to one: the SDK's
    `webhooks.unwrap` checks the signature with the endpoint's secret and parses the event."""
    import http.server
    import json
    import queue
    import threading

    received: "queue.Queue[tuple[bytes, dict]]" = queue.Queue()

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            received.put((body, {k.lower(): v for k, v in self.headers.items()}))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        assert client.webhooks.event_types.list().data == [
            "batch.cancelled", "batch.completed", "batch.expired", "batch.failed"
        ]
        endpoint = client.webhooks.create(name="sdk", url=url, event_types=["batch.completed"])
        assert endpoint.signing_secret.startswith("whsec_") and endpoint.url == url
        assert client.webhooks.retrieve(endpoint.id).name == "sdk"
        assert endpoint.id in [e.id for e in client.webhooks.list()]
        renamed = client.webhooks.update(endpoint.id, name="sdk-renamed")
        assert renamed.name == "sdk-renamed" and renamed.event_types == ["batch.completed"]

        line = {"custom_id": "hooked", "method": "POST", "url": "/v1/images/generations",
                "body": {"prompt": "a weather vane", "size": "64x64", "seed": 5}}
        uploaded = client.files.create(file=("hook.jsonl", json.dumps(line).encode()), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/images/generations", completion_window="24h"
        )
        body, headers = received.get(timeout=300)
        event = client.webhooks.unwrap(body, headers, secret=endpoint.signing_secret)
        assert event.type == "batch.completed" and event.data.id == batch.id, event
        assert client.batches.retrieve(batch.id).status == "completed"
        try:
            client.webhooks.unwrap(body, headers, secret="whsec_" + base64.b64encode(b"x" * 32).decode())
            raise AssertionError("another secret verified the delivery")
        except openai.InvalidWebhookSignatureError:
            pass

        # A rotated secret, the old one kept: a test event carries both signatures.
        rotated = client.webhooks.rotate_secret(endpoint.id, keep_old_secret_active_for_24_hours=True)
        assert rotated.signing_secret != endpoint.signing_secret
        result = client.webhooks.test(endpoint.id, event_type="batch.failed")
        assert (result.status_code, result.success, result.event_type) == (204, True, "batch.failed")
        body, headers = received.get(timeout=30)
        for secret in (rotated.signing_secret, endpoint.signing_secret):
            assert client.webhooks.unwrap(body, headers, secret=secret).type == "batch.failed"

        expect(
            openai.BadRequestError,
            lambda: client.webhooks.create(name="x", url=url, event_types=["response.completed"]),
            param="event_types",
        )
        assert client.webhooks.delete(endpoint.id).deleted
        expect(openai.NotFoundError, lambda: client.webhooks.retrieve(endpoint.id))
    finally:
        server.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--limited-key", required=True)
    ap.add_argument("--ca-file", help="PEM CA that signed the server's HTTPS certificate")
    ap.add_argument("--only", help="comma-separated test names to run (default: all)")
    args = ap.parse_args()
    http_client = None
    if args.ca_file:
        global SSL_CONTEXT
        SSL_CONTEXT = ssl.create_default_context(cafile=args.ca_file)
        http_client = openai.DefaultHttpxClient(verify=SSL_CONTEXT)
    client = OpenAI(
        base_url=args.base_url,
        api_key=args.api_key,
        max_retries=0,
        timeout=600,
        http_client=http_client,
    )
    tests = [
        ("b64_json", lambda: test_b64_json(client)),
        ("model alias and defaults", lambda: test_openai_model_alias_and_defaults(client)),
        ("url then fetch", lambda: test_url_then_fetch(client)),
        ("dall-e quickstart", lambda: test_dall_e_quickstart_reads_url(client)),
        ("azure", lambda: test_azure_openai_client(args.base_url, args.api_key, http_client)),
        ("n=3 seeded", lambda: test_n3_seeded_distinct_and_reproducible(client)),
        ("stream", lambda: test_stream(client)),
        ("edit", lambda: test_edit(client)),
        ("models", lambda: test_models(client)),
        ("batch", lambda: test_batch(client)),
        ("upload in parts", lambda: test_upload_in_parts(client)),
        ("webhooks", lambda: test_webhooks(client)),
        ("retired variations", lambda: test_retired_variations(client)),
        ("BadRequestError", lambda: test_bad_request(client)),
        ("AuthenticationError", lambda: test_authentication(args.base_url)),
        ("NotFoundError", lambda: test_not_found(client)),
        ("RateLimitError", lambda: test_rate_limit(args.base_url, args.limited_key)),
    ]
    if args.only:
        only = args.only.split(",")
        unknown = set(only) - {name for name, _ in tests}
        assert not unknown, f"--only: no test named {unknown}"
        tests = [(name, fn) for name, fn in tests if name in only]
    return run(tests, f"openai {openai.__version__}")


if __name__ == "__main__":
    sys.exit(main())
