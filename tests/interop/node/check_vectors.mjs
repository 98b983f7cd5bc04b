// Independent check of tests/vectors/signing.json, written from docs/signing.md
// alone. No dependencies beyond Node's standard library.
//
//   node tests/interop/node/check_vectors.mjs [path/to/signing.json]
//
// Prints one line per vector and ends with "N passed, M failed"; exits 1 if
// any vector failed.

import { createHash, createPrivateKey, createPublicKey, sign, verify } from "node:crypto";
import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const VECTORS = process.argv[2] ?? resolve(HERE, "..", "..", "vectors", "signing.json");

// --- base58btc (docs/signing.md section 2.1) --------------------------------

const ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
const DIGIT = new Map([...ALPHABET].map((c, i) => [c, BigInt(i)]));

function base58Encode(bytes) {
  let zeros = 0;
  while (zeros < bytes.length && bytes[zeros] === 0) zeros++;
  let n = 0n;
  for (const b of bytes) n = (n << 8n) | BigInt(b);
  let digits = "";
  while (n > 0n) {
    digits = ALPHABET[Number(n % 58n)] + digits;
    n /= 58n;
  }
  return "1".repeat(zeros) + digits;
}

function base58Decode(text) {
  let zeros = 0;
  while (zeros < text.length && text[zeros] === "1") zeros++;
  let n = 0n;
  for (const c of text) {
    const d = DIGIT.get(c);
    if (d === undefined) throw new Error(`not base58btc: ${JSON.stringify(c)}`);
    n = n * 58n + d;
  }
  const body = [];
  while (n > 0n) {
    body.unshift(Number(n & 0xffn));
    n >>= 8n;
  }
  return Buffer.concat([Buffer.alloc(zeros), Buffer.from(body)]);
}

// --- did:key (section 2) ------------------------------------------------------

const DID_PREFIX = "did:key:z";
const MULTICODEC = Buffer.from([0xed, 0x01]);
const MAX_DID_LENGTH = DID_PREFIX.length + 48;

function didFromPublicKey(publicKey) {
  if (publicKey.length !== 32) throw new Error("public key is not 32 bytes");
  return DID_PREFIX + base58Encode(Buffer.concat([MULTICODEC, publicKey]));
}

function publicKeyFromDid(did) {
  if (!did.startsWith("did:")) throw new Error("DID_INVALID: not a DID");
  if (!did.startsWith(DID_PREFIX)) throw new Error("DID_INVALID: not did:key with 'z'");
  if (did.length > MAX_DID_LENGTH) throw new Error("DID_INVALID: too long");
  const raw = base58Decode(did.slice(DID_PREFIX.length));
  if (raw.length < 2 || raw[0] !== 0xed || raw[1] !== 0x01) {
    throw new Error("DID_INVALID: not ed25519-pub");
  }
  const key = raw.subarray(2);
  if (key.length !== 32) throw new Error(`DID_INVALID: key is ${key.length} bytes`);
  if (DID_PREFIX + base58Encode(raw) !== did) throw new Error("DID_INVALID: not canonical");
  return Buffer.from(key);
}

// --- Ed25519 keys --------------------------------------------------------------

const PKCS8_PREFIX = Buffer.from("302e020100300506032b657004220420", "hex");
const SPKI_PREFIX = Buffer.from("302a300506032b6570032100", "hex");

function privateKeyFromSeed(seed) {
  if (seed.length !== 32) throw new Error("seed is not 32 bytes");
  return createPrivateKey({
    key: Buffer.concat([PKCS8_PREFIX, seed]),
    format: "der",
    type: "pkcs8",
  });
}

function rawPublicKey(privateKey) {
  const spki = createPublicKey(privateKey).export({ format: "der", type: "spki" });
  return Buffer.from(spki.subarray(spki.length - 32));
}

function publicKeyObject(raw) {
  return createPublicKey({ key: Buffer.concat([SPKI_PREFIX, raw]), format: "der", type: "spki" });
}

// --- encoding primitives (section 3) -------------------------------------------

class Writer {
  constructor() {
    this.parts = [];
  }
  u32(n) {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(n);
    this.parts.push(b);
  }
  bytes(b) {
    this.u32(b.length);
    this.parts.push(Buffer.from(b));
  }
  str(s) {
    this.bytes(Buffer.from(s, "utf8"));
  }
  u64(n) {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt(n));
    this.parts.push(b);
  }
  i64(n) {
    const b = Buffer.alloc(8);
    b.writeBigInt64BE(BigInt(n));
    this.parts.push(b);
  }
  bool(v) {
    this.parts.push(Buffer.from([v ? 1 : 0]));
  }
  map(m) {
    const entries = Object.entries(m).map(([k, v]) => [
      Buffer.from(k, "utf8"),
      Buffer.from(v, "utf8"),
    ]);
    entries.sort((a, b) => Buffer.compare(a[0], b[0]));
    this.u32(entries.length);
    for (const [k, v] of entries) {
      this.bytes(k);
      this.bytes(v);
    }
  }
  list(items) {
    this.u32(items.length);
    for (const item of items) this.str(item);
  }
  done() {
    return Buffer.concat(this.parts);
  }
}

const sha256 = (data) => createHash("sha256").update(data).digest();
const hex = (text) => Buffer.from(text, "hex");

// --- signing inputs (section 4) -------------------------------------------------

function envelopeSigningInput(e, signer) {
  const w = new Writer();
  w.str("sigwire/v1/envelope");
  for (const text of [
    e.id,
    e.kind,
    e.sender,
    e.recipient,
    e.context_id,
    e.task_id,
    e.role,
    e.content_type,
  ]) {
    w.str(text);
  }
  w.bytes(sha256(hex(e.payload_hex)));
  w.map(e.metadata);
  w.i64(e.created_at_ms);
  w.bytes(hex(e.nonce_hex));
  w.str(e.algorithm);
  w.str(signer);
  return w.done();
}

function replySigningInput(r, signer) {
  const error = r.error ?? { reason: "", message: "", details: {} };
  const w = new Writer();
  w.str("sigwire/v1/reply");
  w.str(r.request_id);
  w.bytes(hex(r.request_digest_hex));
  w.str(r.responder);
  w.bool(r.success);
  w.str(r.content_type);
  w.bytes(sha256(hex(r.data_hex)));
  w.str(error.reason);
  w.str(error.message);
  w.map(error.details);
  w.i64(r.created_at_ms);
  w.u64(r.sequence);
  w.bool(r.final);
  w.str(r.algorithm);
  w.str(signer);
  return w.done();
}

function cardSigningInput(c, signer) {
  const w = new Writer();
  w.str("sigwire/v1/agent-card");
  w.str(c.did);
  w.str(c.name);
  w.list(c.endpoints);
  w.list(c.kinds);
  w.u64(c.max_message_size);
  w.str(c.protocol_version);
  w.i64(c.created_at_ms);
  w.str(c.algorithm);
  w.str(signer);
  return w.done();
}

// --- signature check (section 6.1) ----------------------------------------------

function checkSignature(signature, author, signingInput) {
  if (!signature || signature.value.length === 0) return "SIGNATURE_MISSING";
  if (signature.algorithm !== "Ed25519") return "ALGORITHM_UNSUPPORTED";
  if (signature.signer !== author) return "SIGNATURE_INVALID";
  if (signature.value.length !== 64) return "SIGNATURE_INVALID";
  let key;
  try {
    key = publicKeyObject(publicKeyFromDid(author));
  } catch {
    return "DID_INVALID";
  }
  return verify(null, signingInput, key, signature.value) ? null : "SIGNATURE_INVALID";
}

// --- per-vector checks ----------------------------------------------------------

function expect(condition, problem) {
  if (!condition) throw new Error(problem);
}

function checkCommon(vector, author, algorithm, build) {
  const privateKey = privateKeyFromSeed(hex(vector.signer_seed_hex));
  const did = didFromPublicKey(rawPublicKey(privateKey));
  expect(did === vector.signer_did, `did:key ${did} != signer_did ${vector.signer_did}`);
  expect(author === vector.signer_did, `author ${author} != signer_did`);

  const input = build(vector.signer_did);
  const expected = hex(vector.signing_input_hex);
  if (!input.equals(expected)) {
    let at = 0;
    while (at < input.length && input[at] === expected[at]) at++;
    throw new Error(
      `signing input differs at byte ${at} (got ${input.length} bytes, want ${expected.length})`,
    );
  }

  const signature = sign(null, input, privateKey);
  expect(signature.toString("hex") === vector.signature_hex, "signature != signature_hex");

  const value = hex(vector.signature_hex);
  const good = { signer: vector.signer_did, algorithm, value };
  const result = checkSignature(good, author, input);
  expect(result === null, `signature_hex does not verify: ${result}`);

  // Negative cases: every single-byte change of the signing input must fail.
  for (let i = 0; i < input.length; i++) {
    const tampered = Buffer.from(input);
    tampered[i] ^= 0x01;
    expect(
      checkSignature(good, author, tampered) === "SIGNATURE_INVALID",
      `signature still verifies with byte ${i} of the signing input flipped`,
    );
  }
  const badSig = Buffer.from(value);
  badSig[0] ^= 0x01;
  expect(
    checkSignature({ ...good, value: badSig }, author, input) === "SIGNATURE_INVALID",
    "a flipped signature byte still verifies",
  );
  expect(
    checkSignature({ ...good, algorithm: "ed25519" }, author, input) === "ALGORITHM_UNSUPPORTED",
    "algorithm check",
  );
  expect(
    checkSignature({ ...good, value: Buffer.alloc(0) }, author, input) === "SIGNATURE_MISSING",
    "missing-signature check",
  );
  expect(
    checkSignature({ ...good, value: value.subarray(0, 63) }, author, input) ===
      "SIGNATURE_INVALID",
    "length check",
  );
  expect(
    checkSignature({ ...good, signer: `${author} ` }, author, input) === "SIGNATURE_INVALID",
    "signer == author check",
  );
  expect(
    checkSignature({ ...good, signer: `${author} ` }, `${author} `, input) === "DID_INVALID",
    "a DID with trailing whitespace must not resolve (canonical-encoding check)",
  );
  return input.length;
}

function checkEnvelope(v) {
  const e = v.envelope;
  expect(
    sha256(hex(e.payload_hex)).toString("hex") === v.payload_sha256_hex,
    "payload_sha256_hex",
  );
  return checkCommon(v, e.sender, e.algorithm, (signer) => envelopeSigningInput(e, signer));
}

function checkReply(v, requests) {
  const r = v.reply;
  const digest = sha256(hex(v.request.signature_hex)).toString("hex");
  expect(r.request_digest_hex === digest, "request_digest_hex != SHA-256(request signature)");
  expect(r.request_id === v.request.id, "request_id != request.id");
  const known = requests.get(v.request.id);
  expect(
    known === undefined || known === v.request.signature_hex,
    "request.signature_hex differs from the envelope vector with the same id",
  );
  return checkCommon(v, r.responder, r.algorithm, (signer) => replySigningInput(r, signer));
}

function checkCard(v) {
  const c = v.card;
  expect(c.protocol_version === "sigwire/1", "protocol_version");
  return checkCommon(v, c.did, c.algorithm, (signer) => cardSigningInput(c, signer));
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
const requests = new Map(data.envelopes.map((v) => [v.envelope.id, v.signature_hex]));
const cases = [
  ["self-test", "base58, did:key, SHA-256", () => (selfTest(), 0)],
  ...data.envelopes.map((v) => ["envelope", v.name, () => checkEnvelope(v)]),
  ...data.replies.map((v) => ["reply", v.name, () => checkReply(v, requests)]),
  ...data.cards.map((v) => ["card", v.name, () => checkCard(v)]),
];

let passed = 0;
let failed = 0;
for (const [type, name, run] of cases) {
  try {
    const size = run();
    passed++;
    const note = size ? ` (${size}-byte signing input, ${size} tampered copies rejected)` : "";
    console.log(`ok    ${type} ${JSON.stringify(name)}${note}`);
  } catch (err) {
    failed++;
    console.log(`FAIL  ${type} ${JSON.stringify(name)}: ${err.message}`);
  }
}
if (data.envelopes.length === 0 || data.replies.length === 0 || data.cards.length === 0) {
  failed++;
  console.log("FAIL  the vector file lacks envelopes, replies or cards");
}
console.log(`${passed} passed, ${failed} failed`);
process.exitCode = failed === 0 ? 0 : 1;
