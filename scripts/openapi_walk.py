"""The OpenAPI document's success answers against the real server's: a walk through what a
client does on every route, each answer checked against what the document says of its
operation (a status it lists, one of its content types, and for JSON and server-sent events the
schema).

schemathesis (scripts/test_openapi.sh) sends mostly requests it makes up, which rarely get as far
as a finished batch, a completed upload or a loaded adapter; this walk gets there on purpose.

    python scripts/openapi_walk.py --base-url http://127.0.0.1:8000 --api-key KEY \
        --lora tests/fixtures/reference/lora_kohya.safetensors
"""

import argparse
import base64
import http.server
import json
import re
import sys
import threading
import time

import jsonschema_rs
import requests


class Walk:
    def __init__(self, base, key):
        self.base = base.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {key}"
        self.doc = self.session.get(f"{self.base}/openapi.json", timeout=30).json()
        self.checked = set()

    def schema_of(self, schema):
        """`schema` checkable on its own: the document's components beside it, so its `$ref`s
        resolve."""
        return jsonschema_rs.Draft202012Validator(
            {"$defs": {}, "components": self.doc["components"], **schema}
        )

    def operation(self, method, path):
        """The document's path template that `path` matches, and its operation."""
        for template, item in self.doc["paths"].items():
            pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
            if re.match(pattern, path) and method.lower() in item:
                return template, item[method.lower()]
        sys.exit(f"{method} {path}: not in the document")

    def call(self, method, path, expect=200, **kwargs):
        """`method path`, which must answer `expect` as the document says it does."""
        r = self.session.request(method, f"{self.base}{path}", timeout=120, **kwargs)
        template, op = self.operation(method, path.split("?")[0])
        where = f"{method} {path} -> {r.status_code}"
        if r.status_code != expect:
            sys.exit(f"{where}, expected {expect}: {r.text[:500]}")
        responses = op["responses"]
        response = responses.get(str(r.status_code)) or responses.get("default")
        if response is None:
            sys.exit(f"{where}: the document lists no such status ({sorted(responses)})")
        if "$ref" in response:
            response = self.resolve(response["$ref"])
        content_type = r.headers.get("content-type", "").split(";")[0].strip()
        content = response.get("content", {})
        media = content.get(content_type) or content.get("*/*")
        if media is None:
            sys.exit(f"{where}: content type {content_type!r} is not documented ({sorted(content)})")
        schema = media.get("schema", {})
        if content_type == "application/json":
            self.validate(where, schema, r.json())
        elif content_type == "text/event-stream":
            events = self.events(r.text)
            if not events:
                sys.exit(f"{where}: an empty stream")
            event_schema = self.resolve(schema["$ref"]) if "$ref" in schema else schema
            data_schema = event_schema["properties"]["data"]["contentSchema"]
            for event in events:
                self.validate(where, schema, event)
                self.validate(where, data_schema, json.loads(event["data"]))
        self.checked.add((method.upper(), template, r.status_code))
        return r

    def resolve(self, ref):
        node = self.doc
        for part in ref.lstrip("#/").split("/"):
            node = node[part]
        return node

    def validate(self, where, schema, value):
        errors = [e.message for e in self.schema_of(schema).iter_errors(value)]
        if errors:
            sys.exit(f"{where}: the body is not what the document says: {errors[:5]}\n"
                     f"{json.dumps(value)[:800]}")

    @staticmethod
    def events(text):
        events = []
        for block in text.split("\n\n"):
            event = {}
            for line in block.splitlines():
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    event["data"] = event.get("data", "") + value
                elif name == "event":
                    event["event"] = value
            if event:
                events.append(event)
        return events


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--lora", required=True, help="a LoRA file the served model takes")
    args = ap.parse_args()
    w = Walk(args.base_url, args.api_key)

    for path in ["/health", "/", "/ping", "/livez", "/metrics", "/openapi.json"]:
        w.call("GET", path)
    w.call("OPTIONS", "/")
    model = w.call("GET", "/v1/models").json()["data"][0]["id"]
    w.call("GET", f"/v1/models/{model}")
    w.call("GET", "/v1/models/no-such-model", expect=404)

    # Generations: base64 (a prompt past CLIP's 75 tokens, so `revised_prompt` is a string),
    # a URL and its image, a stream with previews; Azure's and SageMaker's paths.
    long_prompt = " ".join(["a red fox in deep snow"] * 20)
    gen = w.call("POST", "/v1/images/generations", json={
        "prompt": long_prompt, "n": 2, "seed": 1, "user": "walker", "output_format": "webp",
    }).json()
    png = base64.b64decode(w.call("POST", "/v1/images/generations", json={
        "prompt": "a fox", "seed": 2}).json()["data"][0]["b64_json"])
    assert gen["data"][0]["revised_prompt"], gen["data"][0]["revised_prompt"]
    url = w.call("POST", "/v1/images/generations", json={
        "prompt": "a fox", "response_format": "url", "output_format": "jpeg"}).json()
    w.call("GET", "/v1/images/files/" + url["data"][0]["url"].rsplit("/", 1)[1])
    w.call("POST", "/v1/images/generations", json={
        "prompt": "a fox", "stream": True, "steps": 2, "partial_images": 1, "n": 2})
    w.call("POST", f"/openai/deployments/{model}/images/generations?api-version=2024-10-21",
           json={"prompt": "a fox"})
    w.call("POST", "/invocations", json={"prompt": "a fox"})
    w.call("POST", "/v1/images/generations", json={"prompt": "a fox", "n": 11}, expect=400)

    # Edits: the SDKs' form, OpenAI's JSON, a stream.
    w.call("POST", "/v1/images/edits", data={"prompt": "in winter", "strength": "0.5"},
           files={"image": ("fox.png", png, "image/png")})
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    w.call("POST", "/v1/images/edits", json={
        "prompt": "in winter", "images": [{"image_url": data_url}], "mask": None})
    w.call("POST", "/v1/images/edits", data={"prompt": "in winter", "stream": "true"},
           files={"image": ("fox.png", png, "image/png")})
    w.call("POST", f"/openai/deployments/{model}/images/edits", data={"prompt": "snow"},
           files={"image": ("fox.png", png, "image/png")})
    w.call("POST", "/invocations", json={"prompt": "snow", "images": [{"image_url": data_url}]})

    # Files and a batch run to its end.
    lines = "".join(json.dumps({
        "custom_id": f"r{i}", "method": "POST", "url": "/v1/images/generations",
        "body": {"prompt": f"fox {i}", "seed": i},
    }) + "\n" for i in range(2))
    file = w.call("POST", "/v1/files", data={"purpose": "batch"},
                  files={"file": ("in.jsonl", lines.encode(), "application/jsonl")}).json()
    image_file = w.call("POST", "/v1/files", data={"purpose": "vision"},
                        files={"file": ("fox.png", png, "image/png")}).json()
    w.call("POST", "/v1/images/edits", json={
        "prompt": "in winter", "images": [{"file_id": image_file["id"]}]})
    w.call("GET", "/v1/files?limit=5&order=asc")
    w.call("GET", f"/v1/files/{file['id']}")
    w.call("GET", f"/v1/files/{file['id']}/content")
    batch = w.call("POST", "/v1/batches", json={
        "input_file_id": file["id"], "endpoint": "/v1/images/generations",
        "completion_window": "24h", "metadata": {"job": "walk"}}).json()
    for _ in range(600):
        batch = w.call("GET", f"/v1/batches/{batch['id']}").json()
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            break
        time.sleep(0.1)
    assert batch["status"] == "completed", batch
    w.call("GET", f"/v1/files/{batch['output_file_id']}/content")
    w.call("GET", "/v1/batches?limit=2")
    w.call("POST", f"/v1/batches/{batch['id']}/cancel", expect=400)
    # A batch cancelled while it runs.
    batch = w.call("POST", "/v1/batches", json={
        "input_file_id": file["id"], "endpoint": "/v1/images/generations",
        "completion_window": "24h"}).json()
    w.call("POST", f"/v1/batches/{batch['id']}/cancel")
    w.call("DELETE", f"/v1/files/{image_file['id']}")

    # An upload in parts, and one cancelled.
    upload = w.call("POST", "/v1/uploads", json={
        "bytes": len(lines), "filename": "parts.jsonl", "mime_type": "application/jsonl",
        "purpose": "batch"}).json()
    half = len(lines) // 2
    parts = [w.call("POST", f"/v1/uploads/{upload['id']}/parts",
                    files={"data": ("part", lines[i:j].encode())}).json()["id"]
             for i, j in [(0, half), (half, len(lines))]]
    done = w.call("POST", f"/v1/uploads/{upload['id']}/complete",
                  json={"part_ids": parts}).json()
    assert done["file"]["bytes"] == len(lines), done
    other = w.call("POST", "/v1/uploads", json={
        "bytes": 10, "filename": "x.png", "mime_type": "image/png", "purpose": "vision"}).json()
    w.call("POST", f"/v1/uploads/{other['id']}/cancel")

    # Webhook endpoints, with a receiver here that takes every delivery.
    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_):
            pass

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    w.call("GET", "/v1/webhook_event_types")
    hook = w.call("POST", "/v1/webhook_endpoints", json={
        "name": "walk", "url": f"http://127.0.0.1:{receiver.server_port}/hook",
        "event_types": ["batch.completed"]}).json()
    w.call("GET", "/v1/webhook_endpoints")
    w.call("GET", f"/v1/webhook_endpoints/{hook['id']}")
    w.call("POST", f"/v1/webhook_endpoints/{hook['id']}", json={"name": "walked"})
    w.call("POST", f"/v1/webhook_endpoints/{hook['id']}/rotate_secret", json={})
    w.call("POST", f"/v1/webhook_endpoints/{hook['id']}/test",
           json={"event_type": "batch.completed"})
    w.call("POST", f"/v1/webhook_endpoints/{hook['id']}", json={"url": "http://127.0.0.1:9/x"})
    w.call("POST", f"/v1/webhook_endpoints/{hook['id']}/test",
           json={"event_type": "batch.completed"}, expect=400)
    w.call("DELETE", f"/v1/webhook_endpoints/{hook['id']}")

    # A LoRA adapter loaded, used, listed and unloaded.
    w.call("POST", "/v1/load_lora_adapter", json={"lora_name": "ink", "lora_path": args.lora})
    w.call("POST", "/v1/images/generations", json={"prompt": "a fox", "model": "ink"})
    w.call("GET", "/v1/models/ink")
    w.call("POST", "/v1/unload_lora_adapter", json={"lora_name": "ink"})

    # Every operation of the document was answered at least once.
    answered = {(m, t) for m, t, _ in w.checked}
    missing = [f"{m.upper()} {t}" for t, item in w.doc["paths"].items() for m in item
               if (m.upper(), t) not in answered]
    if missing:
        sys.exit(f"operations the walk did not reach: {missing}")
    print(f"openapi walk: {len(w.checked)} (operation, status) pairs answered as documented, "
          f"every one of the document's {len(answered)} operations among them")


if __name__ == "__main__":
    main()
