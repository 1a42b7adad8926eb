// Helpers for the Node.js contract tests (tests/openai_node_test.mjs, tests/ai_sdk_test.mjs):
// their command line and their run, reading a PNG's size, and making the RGBA PNGs an OpenAI
// edit takes as its mask or markup.

import assert from "node:assert/strict";
import zlib from "node:zlib";

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

export function pngSize(buf) {
  assert.ok(buf.subarray(0, 8).equals(PNG_SIGNATURE), "not a PNG");
  assert.equal(buf.subarray(12, 16).toString("latin1"), "IHDR");
  return [buf.readUInt32BE(16), buf.readUInt32BE(20)];
}

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(buf) {
  let c = 0xffffffff;
  for (const b of buf) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** A black RGBA PNG whose alpha at (x, y) is alpha(x, y): an OpenAI edit mask or markup. */
export function rgbaPng(width, height, alpha) {
  const chunk = (kind, data) => {
    const body = Buffer.concat([Buffer.from(kind, "latin1"), data]);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(crc32(body));
    return Buffer.concat([len, body, crc]);
  };
  const rows = [];
  for (let y = 0; y < height; y++) {
    rows.push(Buffer.from([0]));
    for (let x = 0; x < width; x++) rows.push(Buffer.from([0, 0, 0, alpha(x, y)]));
  }
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr.set([8, 6, 0, 0, 0], 8);
  return Buffer.concat([
    PNG_SIGNATURE,
    chunk("IHDR", ihdr),
    chunk("IDAT", zlib.deflateSync(Buffer.concat(rows))),
    chunk("IEND", Buffer.alloc(0)),
  ]);
}

/** The value after `name` in the command line `args`; throws if it is missing. */
export function argument(args, name) {
  const i = args.indexOf(name);
  if (i < 0 || i + 1 >= args.length) throw new Error(`missing ${name}`);
  return args[i + 1];
}

/**
 * Runs each `[name, fn]` of `tests` in turn, printing `ok` or `FAILED` (with the error) for
 * each, then `${label}: N passed, M failed`; exits 1 if any failed, else 0.
 */
export async function runTests(label, tests) {
  let failed = 0;
  for (const [name, fn] of tests) {
    try {
      await fn();
      console.log(`ok     ${name}`);
    } catch (e) {
      failed += 1;
      console.log(`FAILED ${name}`);
      console.log(e?.stack ?? e);
    }
  }
  console.log(`${label}: ${tests.length - failed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}
