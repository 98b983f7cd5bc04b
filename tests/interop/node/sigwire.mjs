// sigwire signing and verification for Node, written from docs/signing.md alone,
// plus the protobuf JSON mapping of Frames (docs/protocol.md section 3).
// No dependencies beyond Node's standard library.
//
// Messages are plain objects with the protobuf field names in lowerCamelCase,
// as @grpc/proto-loader returns them with {longs: String, defaults: true}:
// bytes are Buffers, 64-bit integers are decimal strings, an absent message
// field is null. The JSON mapping below converts to and from the same shape,
// so the signing code never knows which transport a message came over.

import {
  createHash,
  createPrivateKey,
  createPublicKey,
  generateKeyPairSync,
  randomBytes,
  randomUUID,
  sign,
  verify,
} from "node:crypto";

export const ALGORITHM = "Ed25519";
export const PROTOCOL_VERSION = "sigwire/1";
export const HELLO_KIND = "sigwire.hello";

// --- base58btc (section 2.1) ---------------------------------------------------

const ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
const DIGIT = new Map([...ALPHABET].map((c, i) => [c, BigInt(i)]));

export function base58Encode(bytes) {
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

export function base58Decode(text) {
  let zeros = 0;
  while (zeros < text.length && text[zeros] === "1") zeros++;
  let n = 0n;
  for (const c of text) {
    const d = DIGIT.get(c);
    if (d === undefined) {
      throw new SigwireCheck("DID_INVALID", `not base58btc: ${JSON.stringify(c)}`);
    }
    n = n * 58n + d;
  }
  const body = [];
  while (n > 0n) {
    body.unshift(Number(n & 0xffn));
    n >>= 8n;
  }
  return Buffer.concat([Buffer.alloc(zeros), Buffer.from(body)]);
}

// --- errors ----------------------------------------------------------------------

/** A failed check, carrying the sigwire reason it stands for (docs/signing.md section 10). */
export class SigwireCheck extends Error {
  constructor(reason, message) {
    super(`${reason}: ${message}`);
    this.reason = reason;
  }
}

// --- weak keys (section 6.1, "Note on weak keys") --------------------------------
// RFC 8032 section 5.1.3 point decoding, then a multiplication by the cofactor 8:
// a key whose multiple is the neutral element has small order and is refused.

const P = 2n ** 255n - 19n;
const mod = (a) => ((a % P) + P) % P;

function power(base, exponent) {
  let result = 1n;
  let b = mod(base);
  let e = exponent;
  while (e > 0n) {
    if (e & 1n) result = (result * b) % P;
    b = (b * b) % P;
    e >>= 1n;
  }
  return result;
}

const inverse = (a) => power(a, P - 2n);
const D = mod(-121665n * inverse(121666n));
const SQRT_M1 = power(2n, (P - 1n) / 4n);

function decodePoint(raw) {
  let y = 0n;
  for (let i = 31; i >= 0; i--) y = (y << 8n) | BigInt(raw[i]);
  const sign = y >> 255n;
  y &= (1n << 255n) - 1n;
  if (y >= P) return null; // not canonical
  const u = mod(y * y - 1n);
  const v = mod(D * y * y + 1n);
  let x = mod(u * power(v, 3n) * power(u * power(v, 7n), (P - 5n) / 8n));
  const vx2 = mod(v * x * x);
  if (vx2 === mod(-u)) x = mod(x * SQRT_M1);
  else if (vx2 !== u) return null; // no square root: not on the curve
  if (x === 0n && sign === 1n) return null;
  if ((x & 1n) !== sign) x = mod(-x);
  return [x, y];
}

function addPoints([x1, y1], [x2, y2]) {
  // Complete twisted Edwards addition, a = -1.
  const t = mod(D * x1 * x2 * y1 * y2);
  return [mod((x1 * y2 + y1 * x2) * inverse(1n + t)), mod((y1 * y2 + x1 * x2) * inverse(1n - t))];
}

/** Why 32 bytes are not a usable Ed25519 public key, or null when they are. */
export function weakKeyProblem(raw) {
  const point = decodePoint(raw);
  if (point === null) return "not a canonical encoding of a curve point";
  let q = point;
  for (let i = 0; i < 3; i++) q = addPoints(q, q);
  if (q[0] === 0n && q[1] === 1n) return "a small-order point";
  return null;
}

// --- did:key (section 2) ---------------------------------------------------------

const DID_PREFIX = "did:key:z";
const MULTICODEC = Buffer.from([0xed, 0x01]);
const MAX_DID_LENGTH = DID_PREFIX.length + 48;

export function didFromPublicKey(publicKey) {
  if (publicKey.length !== 32) throw new Error("public key is not 32 bytes");
  return DID_PREFIX + base58Encode(Buffer.concat([MULTICODEC, publicKey]));
}

const resolved = new Map();

/** The 32-byte public key of a did:key; throws SigwireCheck DID_INVALID (section 2.3). */
export function publicKeyFromDid(did) {
  let key = resolved.get(did);
  if (key === undefined) {
    key = resolveDid(did);
    if (resolved.size >= 1000) resolved.clear();
    resolved.set(did, key);
  }
  return Buffer.from(key);
}

function resolveDid(did) {
  const bad = (why) => new SigwireCheck("DID_INVALID", `${why}: ${did.slice(0, 120)}`);
  if (!did.startsWith("did:")) throw bad("not a DID");
  if (!did.startsWith(DID_PREFIX)) throw bad("not did:key with base58btc");
  if (did.length > MAX_DID_LENGTH) throw bad("too long");
  const raw = base58Decode(did.slice(DID_PREFIX.length));
  if (raw.length < 2 || raw[0] !== 0xed || raw[1] !== 0x01) throw bad("not ed25519-pub");
  if (raw.length !== 34) throw bad(`key is ${raw.length - 2} bytes`);
  if (DID_PREFIX + base58Encode(raw) !== did) throw bad("not the canonical encoding");
  const key = Buffer.from(raw.subarray(2));
  const weak = weakKeyProblem(key);
  if (weak !== null) throw bad(weak);
  return key;
}

// --- Ed25519 keys ----------------------------------------------------------------

const PKCS8_PREFIX = Buffer.from("302e020100300506032b657004220420", "hex");
const SPKI_PREFIX = Buffer.from("302a300506032b6570032100", "hex");

function rawPublicKey(privateKey) {
  const spki = createPublicKey(privateKey).export({ format: "der", type: "spki" });
  return Buffer.from(spki.subarray(spki.length - 32));
}

function publicKeyObject(raw) {
  return createPublicKey({ key: Buffer.concat([SPKI_PREFIX, raw]), format: "der", type: "spki" });
}

/** An agent identity: an Ed25519 key and its did:key. */
export class Identity {
  constructor(privateKey) {
    this.privateKey = privateKey;
    this.publicKey = rawPublicKey(privateKey);
    this.did = didFromPublicKey(this.publicKey);
  }

  static generate() {
    return new Identity(generateKeyPairSync("ed25519").privateKey);
  }

  static fromSeed(seed) {
    if (seed.length !== 32) throw new Error("seed is not 32 bytes");
    const key = createPrivateKey({
      key: Buffer.concat([PKCS8_PREFIX, seed]),
      format: "der",
      type: "pkcs8",
    });
    return new Identity(key);
  }

  sign(data) {
    return sign(null, data, this.privateKey);
  }
}

// --- encoding primitives (section 3) ---------------------------------------------

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
    // Sorted by the UTF-8 bytes of the keys, not by JavaScript's UTF-16 order.
    const entries = Object.entries(m ?? {}).map(([k, v]) => [
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

export const sha256 = (data) => createHash("sha256").update(data).digest();

// --- signing inputs (section 4) --------------------------------------------------
// `algorithm` and `signer` come from the signature when verifying, and are
// "Ed25519" and the signer's own DID when signing.

export function envelopeSigningInput(e, algorithm, signer) {
  const w = new Writer();
  w.str("sigwire/v1/envelope");
  for (const text of [
    e.id,
    e.kind,
    e.sender,
    e.recipient,
    e.contextId,
    e.taskId,
    e.role,
    e.contentType,
  ]) {
    w.str(text);
  }
  w.bytes(sha256(e.payload));
  w.map(e.metadata);
  w.i64(e.createdAtMs);
  w.bytes(e.nonce);
  w.str(algorithm);
  w.str(signer);
  return w.done();
}

export function replySigningInput(r, algorithm, signer) {
  const error = r.error ?? { reason: "", message: "", details: {} };
  const w = new Writer();
  w.str("sigwire/v1/reply");
  w.str(r.requestId);
  w.bytes(r.requestDigest);
  w.str(r.responder);
  w.bool(r.success);
  w.str(r.contentType);
  w.bytes(sha256(r.data));
  w.str(error.reason);
  w.str(error.message);
  w.map(error.details);
  w.i64(r.createdAtMs);
  w.u64(r.sequence);
  w.bool(r.final);
  w.str(algorithm);
  w.str(signer);
  return w.done();
}

export function cardSigningInput(c, algorithm, signer) {
  const w = new Writer();
  w.str("sigwire/v1/agent-card");
  w.str(c.did);
  w.str(c.name);
  w.list(c.endpoints);
  w.list(c.kinds);
  w.u64(c.maxMessageSize);
  w.str(c.protocolVersion);
  w.i64(c.createdAtMs);
  w.str(algorithm);
  w.str(signer);
  return w.done();
}

// --- signing (section 4.4) and binding (section 5) -------------------------------

function signed(identity, message, author, build) {
  if (author !== identity.did) throw new Error("the signer must be the author");
  const value = identity.sign(build(message, ALGORITHM, identity.did));
  return { ...message, signature: { signer: identity.did, algorithm: ALGORITHM, value } };
}

export const signEnvelope = (identity, e) => signed(identity, e, e.sender, envelopeSigningInput);
export const signReply = (identity, r) => signed(identity, r, r.responder, replySigningInput);
export const signCard = (identity, c) => signed(identity, c, c.did, cardSigningInput);

/** SHA-256 of the request's signature value: what a reply's request_digest must be. */
export function requestDigest(envelope) {
  return sha256(envelope.signature?.value ?? Buffer.alloc(0));
}

/** A new signed envelope from `identity`, with a fresh id, timestamp and 16-byte nonce. */
export function newEnvelope(identity, kind, payload, fields = {}) {
  return signEnvelope(identity, {
    id: randomUUID(),
    kind,
    sender: identity.did,
    recipient: "",
    contextId: "",
    taskId: "",
    role: "",
    payload: Buffer.from(payload ?? ""),
    contentType: "",
    metadata: {},
    createdAtMs: String(Date.now()),
    nonce: randomBytes(16),
    ...fields,
  });
}

/** A signed reply from `identity` to `request`, bound to it. */
export function replyTo(identity, request, fields = {}) {
  return signReply(identity, {
    requestId: request.id,
    success: true,
    data: Buffer.alloc(0),
    contentType: "",
    error: null,
    responder: identity.did,
    createdAtMs: String(Date.now()),
    sequence: "0",
    final: true,
    requestDigest: requestDigest(request),
    ...fields,
  });
}

// --- verification (section 6) ----------------------------------------------------

/** Section 6.1: null when the signature verifies, else the error reason. */
export function checkSignature(signature, author, signingInput) {
  if (!signature || !signature.value || signature.value.length === 0) return "SIGNATURE_MISSING";
  if (signature.algorithm !== ALGORITHM) return "ALGORITHM_UNSUPPORTED";
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

function signatureOk(message, author, build) {
  const sig = message.signature;
  const input = build(message, sig?.algorithm ?? "", sig?.signer ?? "");
  const reason = checkSignature(sig, author, input);
  if (reason !== null) throw new SigwireCheck(reason, `the signature of ${author} does not verify`);
}

/**
 * Section 6.3: throws SigwireCheck unless `reply` answers `request`, comes from
 * `expectedResponder` (when given) and is correctly signed by its responder.
 */
export function verifyReply(reply, request, expectedResponder) {
  if (
    reply.requestId !== request.id ||
    !Buffer.from(reply.requestDigest).equals(requestDigest(request))
  ) {
    throw new SigwireCheck("SIGNATURE_INVALID", "the reply answers a different request");
  }
  if (expectedResponder && reply.responder !== expectedResponder) {
    throw new SigwireCheck(
      "SIGNER_UNKNOWN",
      `reply from ${reply.responder}, expected ${expectedResponder}`,
    );
  }
  signatureOk(reply, reply.responder, replySigningInput);
}

/** Section 6.4. */
export function verifyCard(card, expectedDid) {
  if (expectedDid && card.did !== expectedDid) {
    throw new SigwireCheck("SIGNER_UNKNOWN", `card of ${card.did}, expected ${expectedDid}`);
  }
  signatureOk(card, card.did, cardSigningInput);
}

const PAST_MS = 300_000n;
const FUTURE_MS = 30_000n;

/**
 * Sections 6.2, 7 and the timestamp window of 8, for an envelope this client
 * receives (a push): valid fields, addressed to `me` or to nobody, signed by
 * its sender, and the sender admitted by `trusted` (a DID) when given.
 */
export function verifyEnvelope(e, { me, trusted } = {}) {
  const chars = (s) => [...s].length;
  if (chars(e.id) < 1 || chars(e.id) > 256) throw new SigwireCheck("MALFORMED", "id length");
  if (chars(e.kind) < 1 || chars(e.kind) > 256) throw new SigwireCheck("MALFORMED", "kind length");
  if (!e.sender) throw new SigwireCheck("MALFORMED", "no sender");
  if (e.nonce.length < 16 || e.nonce.length > 64) {
    throw new SigwireCheck("MALFORMED", "nonce length");
  }
  if (BigInt(e.createdAtMs) <= 0n) throw new SigwireCheck("MALFORMED", "created_at_ms");
  if (me && e.recipient && e.recipient !== me) {
    throw new SigwireCheck("RECIPIENT_MISMATCH", `addressed to ${e.recipient}`);
  }
  signatureOk(e, e.sender, envelopeSigningInput);
  if (trusted && e.sender !== trusted) {
    throw new SigwireCheck("SIGNER_UNKNOWN", `sender ${e.sender}`);
  }
  const skew = BigInt(e.createdAtMs) - BigInt(Date.now());
  if (skew < -PAST_MS || skew > FUTURE_MS) {
    throw new SigwireCheck("TIMESTAMP_OUT_OF_WINDOW", `skew ${skew} ms`);
  }
}

// --- the protobuf JSON mapping of Frames (docs/protocol.md section 3) -------------
// Output uses lowerCamelCase names, bytes as base64 and 64-bit integers as
// strings. Input accepts what the mapping allows: lowerCamelCase or original
// names, absent fields meaning their default, numbers or strings for integers.

const b64 = (b) => Buffer.from(b).toString("base64");

function reader(obj) {
  const get = (camel, fallback) => {
    const snake = camel.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
    const value = obj?.[camel] ?? obj?.[snake];
    return value === undefined || value === null ? fallback : value;
  };
  return {
    str: (name) => String(get(name, "")),
    bytes: (name) => Buffer.from(get(name, ""), "base64"),
    int: (name) => String(BigInt(get(name, 0))),
    num: (name) => Number(get(name, 0)),
    bool: (name) => get(name, false) === true,
    map: (name) => ({ ...get(name, {}) }),
    list: (name) => [...get(name, [])],
    msg: (name) => get(name, null),
  };
}

function signatureFromJson(obj) {
  if (obj === null) return null;
  const r = reader(obj);
  return { signer: r.str("signer"), algorithm: r.str("algorithm"), value: r.bytes("value") };
}

const signatureToJson = (s) =>
  s ? { signer: s.signer, algorithm: s.algorithm, value: b64(s.value) } : undefined;

export function envelopeFromJson(obj) {
  const r = reader(obj);
  return {
    id: r.str("id"),
    kind: r.str("kind"),
    sender: r.str("sender"),
    recipient: r.str("recipient"),
    contextId: r.str("contextId"),
    taskId: r.str("taskId"),
    role: r.str("role"),
    payload: r.bytes("payload"),
    contentType: r.str("contentType"),
    metadata: r.map("metadata"),
    createdAtMs: r.int("createdAtMs"),
    nonce: r.bytes("nonce"),
    signature: signatureFromJson(r.msg("signature")),
  };
}

export function envelopeToJson(e) {
  return {
    id: e.id,
    kind: e.kind,
    sender: e.sender,
    recipient: e.recipient,
    contextId: e.contextId,
    taskId: e.taskId,
    role: e.role,
    payload: b64(e.payload),
    contentType: e.contentType,
    metadata: e.metadata,
    createdAtMs: String(e.createdAtMs),
    nonce: b64(e.nonce),
    signature: signatureToJson(e.signature),
  };
}

export function replyFromJson(obj) {
  const r = reader(obj);
  const error = r.msg("error");
  const e = reader(error);
  return {
    requestId: r.str("requestId"),
    success: r.bool("success"),
    data: r.bytes("data"),
    contentType: r.str("contentType"),
    error:
      error === null
        ? null
        : { reason: e.str("reason"), message: e.str("message"), details: e.map("details") },
    responder: r.str("responder"),
    createdAtMs: r.int("createdAtMs"),
    sequence: r.int("sequence"),
    final: r.bool("final"),
    requestDigest: r.bytes("requestDigest"),
    signature: signatureFromJson(r.msg("signature")),
  };
}

export function replyToJson(x) {
  return {
    requestId: x.requestId,
    success: x.success,
    data: b64(x.data),
    contentType: x.contentType,
    error: x.error ?? undefined,
    responder: x.responder,
    createdAtMs: String(x.createdAtMs),
    sequence: String(x.sequence),
    final: x.final,
    requestDigest: b64(x.requestDigest),
    signature: signatureToJson(x.signature),
  };
}

export function cardFromJson(obj) {
  const r = reader(obj);
  return {
    did: r.str("did"),
    name: r.str("name"),
    endpoints: r.list("endpoints"),
    kinds: r.list("kinds"),
    maxMessageSize: r.int("maxMessageSize"),
    protocolVersion: r.str("protocolVersion"),
    createdAtMs: r.int("createdAtMs"),
    signature: signatureFromJson(r.msg("signature")),
  };
}

const BODIES = ["envelopes", "replies", "ack", "ping", "pong", "goaway"];

/** A Frame from its JSON text, in the shape proto-loader gives (`body` names the oneof). */
export function frameFromJson(text) {
  const obj = JSON.parse(text);
  const r = reader(obj);
  const frame = {
    sequence: r.int("sequence"),
    acked: r.int("acked"),
    body: BODIES.find((b) => r.msg(b) !== null),
  };
  const body = reader(r.msg(frame.body));
  if (frame.body === "envelopes")
    frame.envelopes = { envelopes: body.list("envelopes").map(envelopeFromJson) };
  else if (frame.body === "replies")
    frame.replies = { replies: body.list("replies").map(replyFromJson) };
  else if (frame.body === "ack") frame.ack = { sequence: body.int("sequence") };
  else if (frame.body === "ping")
    frame.ping = { token: body.int("token"), sentAtMs: body.int("sentAtMs") };
  else if (frame.body === "pong") frame.pong = { token: body.int("token") };
  else if (frame.body === "goaway") {
    frame.goaway = {
      reason: body.str("reason"),
      message: body.str("message"),
      graceMs: body.num("graceMs"),
    };
  }
  return frame;
}

/** The JSON text of a Frame given in the shape proto-loader takes. */
export function frameToJson(frame) {
  const out = { sequence: String(frame.sequence ?? 0) };
  if (frame.acked !== undefined && BigInt(frame.acked) > 0n) out.acked = String(frame.acked);
  if (frame.envelopes) out.envelopes = { envelopes: frame.envelopes.envelopes.map(envelopeToJson) };
  else if (frame.replies) out.replies = { replies: frame.replies.replies.map(replyToJson) };
  else if (frame.ack) out.ack = { sequence: String(frame.ack.sequence) };
  else if (frame.ping)
    out.ping = { token: String(frame.ping.token), sentAtMs: String(frame.ping.sentAtMs ?? 0) };
  else if (frame.pong) out.pong = { token: String(frame.pong.token) };
  else if (frame.goaway) out.goaway = frame.goaway;
  return JSON.stringify(out);
}

// --- tests/vectors/signing.json (docs/signing.md, "Test vectors") -----------------

const hex = (text) => Buffer.from(text, "hex");

// Vector fields are snake_case (which the JSON readers accept) with bytes in hex.
function vectorMessage(v) {
  if (v.envelope) {
    const e = v.envelope;
    const message = {
      ...envelopeFromJson(e),
      payload: hex(e.payload_hex),
      nonce: hex(e.nonce_hex),
    };
    return [message, e.sender, e.algorithm, envelopeSigningInput];
  }
  if (v.reply) {
    const r = v.reply;
    const message = {
      ...replyFromJson(r),
      data: hex(r.data_hex),
      requestDigest: hex(r.request_digest_hex),
    };
    return [message, r.responder, r.algorithm, replySigningInput];
  }
  return [cardFromJson(v.card), v.card.did, v.card.algorithm, cardSigningInput];
}

/**
 * Checks one vector with this module's own code: the DID from the seed, the
 * signing input rebuilt from the fields, the signature, its verification, the
 * rejection of every single-byte change, and a reply's request digest.
 * Returns the size of the signing input.
 */
export function checkVector(v) {
  const identity = Identity.fromSeed(hex(v.signer_seed_hex));
  if (identity.did !== v.signer_did) throw new Error(`did:key ${identity.did} != ${v.signer_did}`);
  const [message, author, algorithm, build] = vectorMessage(v);
  if (author !== v.signer_did) throw new Error("the author is not the signer");
  const input = build(message, algorithm, v.signer_did);
  if (!input.equals(hex(v.signing_input_hex))) throw new Error("signing input differs");
  if (identity.sign(input).toString("hex") !== v.signature_hex) {
    throw new Error("signature differs");
  }
  const signature = { signer: v.signer_did, algorithm, value: hex(v.signature_hex) };
  const reason = checkSignature(signature, author, input);
  if (reason !== null) throw new Error(`signature_hex does not verify: ${reason}`);
  for (let i = 0; i < input.length; i++) {
    const tampered = Buffer.from(input);
    tampered[i] ^= 0x01;
    if (checkSignature(signature, author, tampered) !== "SIGNATURE_INVALID") {
      throw new Error(`still verifies with byte ${i} flipped`);
    }
  }
  if (v.reply) {
    const request = { id: v.request.id, signature: { value: hex(v.request.signature_hex) } };
    verifyReply({ ...message, signature }, request, v.signer_did);
  }
  return input.length;
}
