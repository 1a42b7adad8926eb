// Contract test: the Vercel AI SDK (`ai`'s generateImage) against a running `turbine serve`,
// through both of its providers a turbine user would pick: `@ai-sdk/openai` (OpenAI's own, with
// a baseURL) and `@ai-sdk/openai-compatible` (the one for OpenAI-compatible servers), and
// `@ai-sdk/azure` for code written against Azure OpenAI. The AI SDK
// builds its own requests: a fixed list of body fields for `@ai-sdk/openai` (so `seed` cannot
// be sent through it: the SDK drops it with a warning), everything in `providerOptions` for
// `@ai-sdk/openai-compatible`, and one request per image unless `maxImagesPerCall` says more.
//
// Run by scripts/test_openai_sdk.sh after the OpenAI Node SDK's test, on the same server (tiny
// model, CPU, 64x64 default size).
//
//   node ai_sdk_test.mjs --base-url URL/v1 --api-key KEY

import assert from "node:assert/strict";

import { createAzure } from "@ai-sdk/azure";
import { createOpenAI } from "@ai-sdk/openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { APICallError, generateImage } from "ai";

import { argument, pngSize, rgbaPng, runTests } from "./node_test_helpers.mjs";

const bytes = (image) => Buffer.from(image.uint8Array);

/** Runs `fn`, which must throw an APICallError with `statusCode`; returns the error. */
async function expectCallError(statusCode, fn) {
  try {
    await fn();
  } catch (e) {
    assert.ok(APICallError.isInstance(e), `expected APICallError, got ${e?.constructor?.name}: ${e}`);
    assert.equal(e.statusCode, statusCode, e.message);
    return e;
  }
  throw new assert.AssertionError({ message: `expected an APICallError ${statusCode}` });
}

async function testOpenAIProvider(openai) {
  // Two images in one request (the SDK makes one request per image for model ids it does not
  // know, unless told otherwise).
  const r = await generateImage({
    model: openai.image("sdxl-turbo"),
    prompt: "a watercolor fox",
    n: 2,
    size: "64x64",
    maxImagesPerCall: 10,
  });
  assert.equal(r.images.length, 2);
  for (const image of r.images) {
    assert.equal(image.mediaType, "image/png");
    assert.deepEqual(pngSize(bytes(image)), [64, 64]);
  }
  assert.ok(!bytes(r.images[0]).equals(bytes(r.images[1])), "two images of one request must differ");
  const meta = r.providerMetadata.openai.images;
  assert.deepEqual(
    meta.map((m) => [m.size, m.quality, m.outputFormat]),
    [
      ["64x64", "low", "png"],
      ["64x64", "low", "png"],
    ],
  );
  assert.deepEqual(r.warnings, []);

  // An OpenAI model name (an alias) with the provider's options, and the seed it drops.
  const webp = await generateImage({
    model: openai.image("gpt-image-1"),
    prompt: "a red bicycle",
    size: "64x64",
    seed: 3,
    providerOptions: { openai: { outputFormat: "webp", quality: "medium", outputCompression: 80 } },
  });
  assert.equal(webp.images[0].mediaType, "image/webp");
  assert.deepEqual(webp.providerMetadata.openai.images[0].quality, "medium");
  assert.deepEqual(
    webp.warnings.map((w) => w.feature),
    ["seed"],
  );
}

async function testCompatibleProvider(turbine) {
  // Extensions go in providerOptions under the provider's name, and reach the server as is.
  const run = (n) =>
    generateImage({
      model: turbine.imageModel("sdxl-turbo"),
      prompt: "three moons",
      n,
      size: "64x64",
      maxImagesPerCall: 10,
      providerOptions: { turbine: { seed: 500, steps: 2 } },
    });
  const first = await run(3);
  const images = first.images.map(bytes);
  assert.equal(new Set(images.map((b) => b.toString("base64"))).size, 3, "the three images must differ");
  const again = (await run(3)).images.map(bytes);
  again.forEach((b, i) => assert.ok(b.equals(images[i]), "same prompt and seed must reproduce the images"));
  const one = await run(1);
  assert.ok(bytes(one.images[0]).equals(images[0]), "the first image of a batch is the image made alone");
  // OpenAI's own field names, as the README's example sends them.
  const webp = await generateImage({
    model: turbine.imageModel("gpt-image-1"),
    prompt: "a product photo of a mug",
    size: "64x64",
    providerOptions: { turbine: { seed: 42, output_format: "webp", quality: "medium" } },
  });
  assert.equal(webp.images[0].mediaType, "image/webp");
  assert.deepEqual(webp.warnings, []);
}

async function testEdit(openai) {
  const source = bytes(
    (await generateImage({ model: openai.image("sdxl-turbo"), prompt: "a harbour", size: "64x64" })).images[0],
  );
  // A mask repaints its transparent square: an OpenAI edit, sent as the SDK's multipart form.
  const mask = rgbaPng(64, 64, (x, y) => (x >= 16 && x < 48 && y >= 16 && y < 48 ? 0 : 255));
  const edited = await generateImage({
    model: openai.image("gpt-image-1"),
    prompt: { text: "the harbour at night", images: [source], mask },
    n: 2,
    size: "64x64",
    maxImagesPerCall: 10,
  });
  assert.equal(edited.images.length, 2);
  for (const image of edited.images) {
    assert.deepEqual(pngSize(bytes(image)), [64, 64]);
    assert.ok(!bytes(image).equals(source), "the edit changed nothing");
  }
  assert.equal(edited.usage.inputTokens > 0, true);
}

async function testErrors(openai, baseURL) {
  const e = await expectCallError(400, () =>
    generateImage({ model: openai.image("sdxl-turbo"), prompt: "x", size: "13x13", maxRetries: 0 }),
  );
  assert.ok(e.message.includes("size"), e.message);
  assert.equal(e.isRetryable, false);
  const missing = await expectCallError(404, () =>
    generateImage({ model: openai.image("no-such-model"), prompt: "x", maxRetries: 0 }),
  );
  assert.equal(JSON.parse(missing.responseBody).error.code, "model_not_found");
  const wrongKey = createOpenAI({ baseURL, apiKey: "sk-wrong" });
  await expectCallError(401, () => generateImage({ model: wrongKey.image("sdxl-turbo"), prompt: "x", maxRetries: 0 }));
}

async function testAzureProvider(baseURL, apiKey) {
  // @ai-sdk/azure, for code written against an Azure OpenAI image deployment: Azure's v1 API
  // (`/openai/v1/...`) and its deployment URLs (`/openai/deployments/{model}/...`), the key in
  // an `api-key` header.
  const origin = baseURL.replace(/\/v1\/?$/, "");
  const v1 = createAzure({ baseURL: `${origin}/openai/v1`, apiKey });
  const deployments = createAzure({
    baseURL: `${origin}/openai`,
    apiKey,
    useDeploymentBasedUrls: true,
    apiVersion: "2025-04-01-preview",
  });
  for (const azure of [v1, deployments]) {
    const r = await generateImage({ model: azure.image("gpt-image-1"), prompt: "a watercolor fox", size: "64x64" });
    assert.equal(r.images.length, 1);
    assert.deepEqual(pngSize(bytes(r.images[0])), [64, 64]);
  }
  const wrongKey = createAzure({ baseURL: `${origin}/openai/v1`, apiKey: "sk-wrong" });
  await expectCallError(401, () => generateImage({ model: wrongKey.image("gpt-image-1"), prompt: "x", maxRetries: 0 }));
}

async function main() {
  const args = process.argv.slice(2);
  const baseURL = argument(args, "--base-url");
  const apiKey = argument(args, "--api-key");
  globalThis.AI_SDK_LOG_WARNINGS = false;
  const openai = createOpenAI({ baseURL, apiKey });
  const turbine = createOpenAICompatible({ name: "turbine", baseURL, apiKey });
  await runTests("ai sdk", [
    ["@ai-sdk/openai generateImage", () => testOpenAIProvider(openai)],
    ["@ai-sdk/openai-compatible seeded", () => testCompatibleProvider(turbine)],
    ["edit with a mask", () => testEdit(openai)],
    ["errors", () => testErrors(openai, baseURL)],
    ["@ai-sdk/azure", () => testAzureProvider(baseURL, apiKey)],
  ]);
}

await main();
