// Independent check of tests/vectors/signing.json, written from docs/signing.md
// alone. No dependencies beyond Node's standard library.
//
//   node tests/interop/node/check_vectors.mjs [path/to/signing.json]
//
// Prints one line per vector and ends with "N passed, M failed"; exits 1 if
// any vector failed.

import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

// The signing code lives in sigwire.mjs (written from docs/signing.md alone and
// shared with the interop clients); this program only drives it over the vectors.
import {
  base58Decode,
  base58Encode,
  checkBatchVector,
  checkVector,
  publicKeyFromDid,
  sha256,
  vectorRequests,
} from "./sigwire.mjs";

const HERE = dirname(fileURLToPath(import.meta.url));
const VECTORS = process.argv[2] ?? resolve(HERE, "..", "..", "vectors", "signing.json");

function expect(condition, problem) {
  if (!condition) throw new Error(problem);
}

function selfTest() {
  // section 2: empty digest and a did:key that fails the multicodec check.
  expect(
    sha256(Buffer.alloc(0)).toString("hex") ===
      "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "SHA-256 of the empty string",
  );
  const roundTrip = Buffer.from([0, 0, 1, 2, 255]);
  expect(base58Decode(base58Encode(roundTrip)).equals(roundTrip), "base58 round trip");
  for (const bad of ["did:web:example.com", "did:key:z", "did:key:z0", "did:key:zabc"]) {
    let rejected = false;
    try {
      publicKeyFromDid(bad);
    } catch {
      rejected = true;
    }
    expect(rejected, `${bad} must not resolve`);
  }
}

// --- main -----------------------------------------------------------------------

const data = JSON.parse(readFileSync(VECTORS, "utf8"));
const batches = data.batches ?? [];
const requests = vectorRequests(data);
const cases = [
  ["self-test", "base58, did:key, SHA-256", () => (selfTest(), 0)],
  ...data.envelopes.map((v) => ["envelope", v.name, () => checkVector(v)]),
  ...data.replies.map((v) => ["reply", v.name, () => checkVector(v)]),
  ...data.cards.map((v) => ["card", v.name, () => checkVector(v)]),
  ...batches.map((v) => ["batch", v.name, () => checkBatchVector(v, requests)]),
];

let passed = 0;
let failed = 0;
for (const [type, name, run] of cases) {
  try {
    const size = run();
    passed++;
    let note = "";
    if (typeof size === "string") note = ` (${size})`;
    else if (size) note = ` (${size}-byte signing input, ${size} tampered copies rejected)`;
    console.log(`ok    ${type} ${JSON.stringify(name)}${note}`);
  } catch (err) {
    failed++;
    console.log(`FAIL  ${type} ${JSON.stringify(name)}: ${err.message}`);
  }
}
if (
  data.envelopes.length === 0 ||
  data.replies.length === 0 ||
  data.cards.length === 0 ||
  !batches.some((v) => v.kind === "envelopes") ||
  !batches.some((v) => v.kind === "replies")
) {
  failed++;
  console.log("FAIL  the vector file lacks envelopes, replies, cards or batches of both kinds");
}
console.log(`${passed} passed, ${failed} failed`);
process.exitCode = failed === 0 ? 0 : 1;
