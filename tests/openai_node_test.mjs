// Contract test: the official `openai` Node.js SDK against a running `turbine serve`.
//
// Run by scripts/test_openai_sdk.sh after the Python SDK's test (tests/openai_sdk_test.py), on
// the same server (tiny model, CPU, 64x64 default size), with two API keys: a plain one and one
// limited to 1 request per minute that no other test uses. The Node SDK builds its requests its
// own way (fetch, its own multipart encoder, extension fields passed as plain params), so this
// checks the server against a second official client, not the Python one twice.
//
//   node openai_node_test.mjs --base-url URL/v1 --api-key KEY --limited-key KEY

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import http from "node:http";

import OpenAI, { toFile } from "openai";
import { VERSION } from "openai/version";

import { argument, pngSize, rgbaPng, runTests } from "./node_test_helpers.mjs";

const b64 = (image) => Buffer.from(image.b64_json, "base64");

/** Runs `fn`, which must throw `type`; checks the error's param and code; returns it. */
async function expectError(type, fn, { param, code } = {}) {
  try {
    await fn();
  } catch (e) {
    assert.ok(e instanceof type, `expected ${type.name}, got ${e?.constructor?.name}: ${e}`);
    if (param !== undefined) assert.equal(e.param, param);
    if (code !== undefined) assert.equal(e.code, code);
    return e;
  }
  throw new assert.AssertionError({ message: `expected ${type.name}` });
}

async function testB64Json(client) {
  // Extensions (seed) are plain params: the Node SDK sends what it is given.
  const resp = await client.images.generate({
    model: "sdxl-turbo",
    prompt: "a watercolor fox",
    size: "64x64",
    response_format: "b64_json",
    seed: 11,
  });
  assert.ok(resp.created > 0);
  assert.deepEqual([resp.size, resp.output_format, resp.quality, resp.background], ["64x64", "png", "low", "opaque"]);
  assert.equal(resp.usage.output_tokens, 64);
  assert.ok(resp.usage.input_tokens > 0);
  assert.equal(resp.data.length, 1);
  assert.equal(resp.data[0].seed, 11);
  assert.equal(resp.data[0].url, undefined);
  assert.deepEqual(pngSize(b64(resp.data[0])), [64, 64]);
}

async function testUrlThenFetch(client) {
  const resp = await client.images.generate({
    model: "gpt-image-2.5-flare",
    prompt: "a red bicycle",
    response_format: "url",
    output_format: "webp",
  });
  const url = resp.data[0].url;
  assert.ok(url && url.includes("/v1/images/files/"), url);
  // On this server, in the scheme the client used.
  const origin = client.baseURL.replace(/\/$/, "").replace(/\/v1$/, "");
  assert.ok(url.startsWith(`${origin}/v1/images/files/`), `${url} vs ${origin}`);
  assert.equal(resp.data[0].b64_json, undefined);
  const fetched = await fetch(url);
  assert.equal(fetched.status, 200);
  assert.equal(fetched.headers.get("content-type"), "image/webp");
  const bytes = Buffer.from(await fetched.arrayBuffer());
  assert.equal(bytes.subarray(0, 4).toString("latin1"), "RIFF");
  assert.equal(bytes.subarray(8, 12).toString("latin1"), "WEBP");
}

async function testSeededN(client) {
  const run = () => client.images.generate({ prompt: "three moons", n: 3, size: "64x64", seed: 500 });
  const first = await run();
  assert.deepEqual(first.data.map((d) => d.seed), [500, 501, 502]);
  const blobs = first.data.map(b64);
  assert.equal(new Set(blobs.map((b) => b.toString("base64"))).size, 3, "the three images must differ");
  const again = (await run()).data.map(b64);
  again.forEach((b, i) => assert.ok(b.equals(blobs[i]), "same prompt and seed must reproduce the images"));
  const alone = await client.images.generate({ prompt: "three moons", size: "64x64", seed: 502 });
  assert.ok(b64(alone.data[0]).equals(blobs[2]), "an image of a batch is the image made alone");
}

async function testStream(client) {
  const params = { prompt: "a streamed lighthouse", n: 2, size: "64x64", seed: 21, safety_identifier: "node-7" };
  const plain = await client.images.generate(params);
  assert.equal(plain.safety_identifier, "node-7");
  const stream = await client.images.generate({ ...params, stream: true, partial_images: 1 });
  const events = [];
  for await (const event of stream) events.push(event);
  assert.deepEqual(events.map((e) => e.type), ["image_generation.completed", "image_generation.completed"]);
  for (const e of events) {
    assert.deepEqual([e.size, e.output_format, e.quality, e.background], ["64x64", "png", "low", "opaque"]);
    assert.equal(e.safety_identifier, "node-7");
    assert.ok(b64(e).equals(b64(plain.data[e.seed - 21])), `streamed image ${e.seed}`);
  }
  // Two steps: one preview before the image, the first step's estimate (the one-step image).
  const previewed = [];
  for await (const e of await client.images.generate({ ...params, n: 1, steps: 2, stream: true, partial_images: 3 }))
    previewed.push(e);
  assert.deepEqual(previewed.map((e) => e.type), ["image_generation.partial_image", "image_generation.completed"]);
  assert.equal(previewed[0].partial_image_index, 0);
  assert.ok(b64(previewed[0]).equals(b64(plain.data[0])), "the preview after the first step");
}

async function testEdit(client) {
  const source = b64(
    (await client.images.generate({ prompt: "a harbour", size: "64x64", seed: 30 })).data[0],
  );
  const edit = async (params) =>
    client.images.edit({
      image: await toFile(source, "harbour.png", { type: "image/png" }),
      prompt: "the harbour at night",
      size: "64x64",
      ...params,
    });
  // Numbers in a multipart form: the Node SDK's encoding of n, seed and strength.
  const resp = await edit({ model: "gpt-image-2", n: 2, seed: 31, strength: 0.5 });
  assert.deepEqual([resp.size, resp.output_format, resp.quality], ["64x64", "png", "low"]);
  assert.deepEqual(resp.data.map((d) => d.seed), [31, 32]);
  assert.equal(resp.usage.input_tokens_details.image_tokens, 128);
  const outputs = resp.data.map(b64);
  outputs.forEach((o) => assert.deepEqual(pngSize(o), [64, 64]));
  assert.ok(!outputs[0].equals(outputs[1]) && !outputs[0].equals(source));
  const again = await edit({ seed: 31, strength: 0.5 });
  assert.ok(b64(again.data[0]).equals(outputs[0]), "seeded edits reproduce");

  // A boolean in the form, and the edit's events.
  const events = [];
  for await (const e of await edit({ n: 2, seed: 31, stream: true })) events.push(e);
  assert.deepEqual(events.map((e) => e.type), ["image_edit.completed", "image_edit.completed"]);
  for (const e of events) assert.ok(b64(e).equals(outputs[e.seed - 31]));

  // A mask repaints its transparent square; a markup draws over the image; not both.
  const mask = rgbaPng(64, 64, (x, y) => (x >= 16 && x < 48 && y >= 16 && y < 48 ? 0 : 255));
  const masked = await edit({ mask: await toFile(mask, "mask.png", { type: "image/png" }), seed: 31 });
  assert.ok(!b64(masked.data[0]).equals(outputs[0]), "the mask changed nothing");
  const markup = rgbaPng(64, 64, (x) => (x >= 24 && x < 40 ? 255 : 0));
  const marked = await edit({ markup: await toFile(markup, "markup.png", { type: "image/png" }), seed: 31 });
  assert.ok(!b64(marked.data[0]).equals(outputs[0]), "the markup changed nothing");
  await expectError(
    OpenAI.BadRequestError,
    async () =>
      edit({
        mask: await toFile(mask, "mask.png", { type: "image/png" }),
        markup: await toFile(markup, "markup.png", { type: "image/png" }),
      }),
    { param: "markup" },
  );
  await expectError(
    OpenAI.BadRequestError,
    async () => edit({ mask: await toFile(source, "mask.png", { type: "image/png" }) }),
    { param: "mask", code: "invalid_image" },
  );
  await expectError(OpenAI.BadRequestError, () => edit({ strength: 2 }), { param: "strength" });
}

async function testModels(client) {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  assert.equal(ids[0], "sdxl-turbo");
  assert.ok(ids.includes("dall-e-3"), ids.join(","));
  for (const name of ["gpt-image-2.6-flare", "chatgpt-image-latest", "sdxl-turbo"]) {
    const m = await client.models.retrieve(name);
    assert.deepEqual([m.id, m.owned_by], [name, "turbine"]);
  }
}

async function testErrors(client, baseURL) {
  await expectError(OpenAI.BadRequestError, () => client.images.generate({ prompt: "x", n: 11 }), { param: "n" });
  await expectError(OpenAI.BadRequestError, () => client.images.generate({ prompt: "x", size: "abc" }), {
    param: "size",
  });
  await expectError(OpenAI.BadRequestError, () => client.images.generate({ prompt: "x", quality: "ultra" }), {
    param: "quality",
  });
  await expectError(OpenAI.NotFoundError, () => client.images.generate({ model: "no-such-model", prompt: "x" }), {
    param: "model",
    code: "model_not_found",
  });
  const bad = new OpenAI({ baseURL, apiKey: "sk-wrong", maxRetries: 0 });
  await expectError(OpenAI.AuthenticationError, () => bad.images.generate({ prompt: "x" }), {
    code: "invalid_api_key",
  });
}

async function testRateLimit(baseURL, limitedKey) {
  const limited = new OpenAI({ baseURL, apiKey: limitedKey, maxRetries: 0 });
  const { response } = await limited.images.generate({ prompt: "first of the minute", size: "64x64" }).withResponse();
  assert.equal(response.headers.get("x-ratelimit-limit-requests"), "1");
  assert.equal(response.headers.get("x-ratelimit-remaining-requests"), "0");
  const e = await expectError(OpenAI.RateLimitError, () => limited.images.generate({ prompt: "second" }), {
    code: "rate_limit_exceeded",
  });
  assert.ok(Number(e.headers.get("retry-after")) >= 1);
}

async function testWebhooks(client) {
  // An endpoint made with the SDK, a test event to a local receiver, checked by the SDK's own
  // signature verification with the endpoint's secret.
  const received = [];
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      received.push({ body: Buffer.concat(chunks).toString("utf8"), headers: req.headers });
      res.writeHead(200).end();
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  try {
    const url = `http://127.0.0.1:${server.address().port}/hook`;
    const endpoint = await client.webhooks.create({ name: "node", url, event_types: ["batch.expired"] });
    assert.ok(endpoint.signing_secret.startsWith("whsec_"));
    assert.ok(endpoint.id.startsWith("whe_"));
    const result = await client.webhooks.test(endpoint.id, { event_type: "batch.expired" });
    assert.deepEqual([result.status_code, result.success], [200, true]);
    assert.equal(received.length, 1);
    const event = await client.webhooks.unwrap(received[0].body, received[0].headers, endpoint.signing_secret);
    assert.equal(event.type, "batch.expired");
    const rotated = await client.webhooks.rotateSecret(endpoint.id);
    await assert.rejects(
      client.webhooks.unwrap(received[0].body, received[0].headers, rotated.signing_secret),
      OpenAI.InvalidWebhookSignatureError,
    );
    assert.equal((await client.webhooks.delete(endpoint.id)).deleted, true);
  } finally {
    server.close();
  }
}

async function testBatch(client) {
  // An edits batch (the Python test runs generations): JSON edits with data URLs as lines.
  const input = (await client.images.generate({ prompt: "a quay", size: "64x64", seed: 41 })).data[0];
  // One line carries the image inline, the other names it as a file uploaded once.
  const photo = await client.files.create({ file: await toFile(b64(input), "quay.png"), purpose: "vision" });
  assert.equal(photo.purpose, "vision");
  const references = [{ image_url: `data:image/png;base64,${input.b64_json}` }, { file_id: photo.id }];
  const lines = [0, 1].map((i) =>
    JSON.stringify({
      custom_id: `quay-${i}`,
      method: "POST",
      url: "/v1/images/edits",
      body: { prompt: `the quay at night ${i}`, images: [references[i]], seed: 60 + i },
    }),
  );
  const file = await client.files.create({
    file: await toFile(Buffer.from(lines.join("\n")), "edits.jsonl"),
    purpose: "batch",
  });
  assert.equal(file.purpose, "batch");
  let batch = await client.batches.create({
    input_file_id: file.id,
    endpoint: "/v1/images/edits",
    completion_window: "24h",
  });
  const deadline = Date.now() + 300_000;
  while (!["completed", "failed", "cancelled", "expired"].includes(batch.status)) {
    assert.ok(Date.now() < deadline, `the batch never ended: ${JSON.stringify(batch)}`);
    await new Promise((r) => setTimeout(r, 50));
    batch = await client.batches.retrieve(batch.id);
  }
  assert.equal(batch.status, "completed", JSON.stringify(batch));
  assert.deepEqual(batch.request_counts, { total: 2, completed: 2, failed: 0 });
  assert.equal(batch.error_file_id, null);
  const text = await (await client.files.content(batch.output_file_id)).text();
  const results = text.trim().split("\n").map((l) => JSON.parse(l));
  assert.deepEqual(results.map((r) => r.custom_id).sort(), ["quay-0", "quay-1"]);
  for (const r of results) {
    assert.equal(r.response.status_code, 200);
    const out = r.response.body.data[0];
    assert.equal(out.seed, 60 + Number(r.custom_id.split("-")[1]));
    assert.deepEqual(pngSize(b64(out)), [64, 64]);
  }
  const page = await client.batches.list({ limit: 1 });
  assert.equal(page.data[0].id, batch.id);
}

async function testUploadInParts(client) {
  // An image for edits sent through the Uploads API in three parts, out of order, joined in the
  // order named with its MD5, then edited by file_id in a JSON edit.
  const png = b64((await client.images.generate({ prompt: "a lantern", size: "64x64", seed: 77 })).data[0]);
  let upload = await client.uploads.create({
    bytes: png.length,
    filename: "lantern.png",
    mime_type: "image/png",
    purpose: "vision",
  });
  assert.equal(upload.status, "pending");
  const cuts = [0, 100, Math.floor(png.length / 2), png.length];
  const ids = [];
  for (const i of [2, 0, 1]) {
    const data = await toFile(png.subarray(cuts[i], cuts[i + 1]), "part");
    ids[i] = (await client.uploads.parts.create(upload.id, { data })).id;
  }
  const md5 = createHash("md5").update(png).digest("hex");
  upload = await client.uploads.complete(upload.id, { part_ids: ids, md5 });
  assert.equal(upload.status, "completed");
  assert.equal(upload.file.purpose, "vision");
  assert.equal(upload.file.bytes, png.length);
  const back = Buffer.from(await (await client.files.content(upload.file.id)).arrayBuffer());
  assert.ok(back.equals(png), "the file is the parts in order");
  const edited = await client.post("/images/edits", {
    body: { prompt: "the lantern lit", images: [{ file_id: upload.file.id }], seed: 3 },
  });
  assert.deepEqual(pngSize(b64(edited.data[0])), [64, 64]);

  const dropped = await client.uploads.create({
    bytes: 10,
    filename: "jobs.jsonl",
    mime_type: "application/jsonl",
    purpose: "batch",
  });
  assert.equal((await client.uploads.cancel(dropped.id)).status, "cancelled");
  await expectError(OpenAI.BadRequestError, () => client.uploads.complete(dropped.id, { part_ids: [] }));
}

async function main() {
  const args = process.argv.slice(2);
  const arg = (name) => argument(args, name);
  const baseURL = arg("--base-url");
  const client = new OpenAI({ baseURL, apiKey: arg("--api-key"), maxRetries: 0, timeout: 600_000 });
  let tests = [
    ["b64_json", () => testB64Json(client)],
    ["url then fetch", () => testUrlThenFetch(client)],
    ["n=3 seeded", () => testSeededN(client)],
    ["stream", () => testStream(client)],
    ["edit", () => testEdit(client)],
    ["models", () => testModels(client)],
    ["batch", () => testBatch(client)],
    ["upload in parts", () => testUploadInParts(client)],
    ["webhooks", () => testWebhooks(client)],
    ["errors", () => testErrors(client, baseURL)],
    ["RateLimitError", () => testRateLimit(baseURL, arg("--limited-key"))],
  ];
  const only = args.includes("--only") ? arg("--only").split(",") : null;
  if (only) {
    const unknown = only.filter((n) => !tests.some(([name]) => name === n));
    if (unknown.length) throw new Error(`--only: no test named ${unknown}`);
    tests = tests.filter(([name]) => only.includes(name));
  }
  await runTests(`openai (node) ${VERSION}`, tests);
}

await main();
