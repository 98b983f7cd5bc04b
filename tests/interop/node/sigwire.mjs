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
/** Hello metadata entry by which a client accepts batch signatures (section 4.5). */
export const BATCH_SIGNATURES_KEY = "sigwire.batch-signatures";

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

// --- batch signatures (section 4.5) ----------------------------------------------
// A Merkle tree with the shape of RFC 9162 section 2.1.1 over the leaves
// H(0x00 || signing input), interior nodes H(0x01 || left || right); one Ed25519
// signature over the batch signing input (domain, size, root, algorithm, signer).

export const BATCH_DOMAIN = "sigwire/v1/batch";
export const MAX_BATCH_SIZE = 65536;
const MAX_PATH_HASHES = 16;
const LEAF_PREFIX = Buffer.from([0x00]);
const NODE_PREFIX = Buffer.from([0x01]);

export const leafHash = (signingInput) => sha256(Buffer.concat([LEAF_PREFIX, signingInput]));
export const nodeHash = (left, right) => sha256(Buffer.concat([NODE_PREFIX, left, right]));

/**
 * MTH(D[n]) and every PATH(m, D[n]) of RFC 9162 sections 2.1.1 and 2.1.3.1:
 * returns [root, paths] with paths[m] the sibling hashes of leaf m, leaf to root.
 */
export function merkleTree(leaves) {
  if (leaves.length < 1 || leaves.length > MAX_BATCH_SIZE) {
    throw new Error(`a batch holds 1..${MAX_BATCH_SIZE} messages, not ${leaves.length}`);
  }
  const paths = leaves.map(() => []);
  // MTH(D[lo:hi]); on the way back up, each leaf of one subtree gets the other
  // subtree's hash appended: PATH(m, D) = PATH(m, subtree) : MTH(other subtree).
  const mth = (lo, hi) => {
    const n = hi - lo;
    if (n === 1) return leaves[lo];
    let k = 1;
    while (k * 2 < n) k *= 2; // the largest power of two smaller than n
    const left = mth(lo, lo + k);
    const right = mth(lo + k, hi);
    for (let m = lo; m < lo + k; m++) paths[m].push(right);
    for (let m = lo + k; m < hi; m++) paths[m].push(left);
    return nodeHash(left, right);
  };
  return [mth(0, leaves.length), paths];
}

/**
 * The root an inclusion proof leads to from `leaf`: RFC 9162 section 2.1.3.2
 * with the checks of docs/signing.md section 6.1 step 6. Throws SigwireCheck
 * SIGNATURE_INVALID for a proof that does not fit its tree.
 */
export function rootFromProof(leaf, { index, size, path }) {
  const bad = (why) => new SigwireCheck("SIGNATURE_INVALID", `batch proof: ${why}`);
  const n = Number(size);
  const i = Number(index);
  if (!Number.isInteger(n) || n < 1 || n > MAX_BATCH_SIZE) throw bad(`size ${size}`);
  if (!Number.isInteger(i) || i < 0 || i >= n) throw bad(`index ${index} of ${size}`);
  const hashes = path ?? [];
  if (hashes.length > MAX_PATH_HASHES) throw bad(`${hashes.length} hashes`);
  let fn = i;
  let sn = n - 1;
  let r = Buffer.from(leaf);
  for (const p of hashes) {
    if (p.length !== 32) throw bad(`a ${p.length}-byte hash`);
    if (sn === 0) throw bad("the path is longer than the tree is deep");
    if (fn % 2 === 1 || fn === sn) {
      r = nodeHash(p, r);
      // fn === sn on a left child: climb past the levels where it has no sibling.
      while (fn % 2 === 0 && fn !== 0) {
        fn = Math.floor(fn / 2);
        sn = Math.floor(sn / 2);
      }
    } else {
      r = nodeHash(r, p);
    }
    fn = Math.floor(fn / 2);
    sn = Math.floor(sn / 2);
  }
  if (sn !== 0) throw bad("the path is shorter than the tree is deep");
  return r;
}

/** The batch signing input (section 4.5): what a batch signature signs. */
export function batchSigningInput(size, root, algorithm, signer) {
  const w = new Writer();
  w.str(BATCH_DOMAIN);
  w.u64(size);
  w.bytes(root);
  w.str(algorithm);
  w.str(signer);
  return w.done();
}

const isReply = (message) => "responder" in message;
const authorOf = (message) => (isReply(message) ? message.responder : message.sender);
const signingInputOf = (message, algorithm, signer) =>
  (isReply(message) ? replySigningInput : envelopeSigningInput)(message, algorithm, signer);

/**
 * `messages` (envelopes and/or replies, all authored by `identity`) signed
 * together with one Ed25519 signature; each carries the signature and its own
 * inclusion proof `batch: {index, size, path}`. A single message also gets a
 * (one-leaf) batch proof: sign it with signEnvelope or signReply to avoid that.
 */
export function signBatch(identity, messages) {
  for (const m of messages) {
    if (authorOf(m) !== identity.did) throw new Error("the signer must be the author");
  }
  const leaves = messages.map((m) => leafHash(signingInputOf(m, ALGORITHM, identity.did)));
  const [root, paths] = merkleTree(leaves);
  const size = messages.length;
  const value = identity.sign(batchSigningInput(size, root, ALGORITHM, identity.did));
  return messages.map((m, index) => ({
    ...m,
    signature: {
      signer: identity.did,
      algorithm: ALGORITHM,
      value,
      batch: { index, size, path: paths[index] },
    },
  }));
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

/**
 * What a reply's request_digest must be (section 5): SHA-256 of the request's
 * signature value, or of the value followed by the request's own leaf when the
 * request is batch-signed (its value is shared by the whole batch).
 */
export function requestDigest(envelope) {
  const sig = envelope.signature;
  const value = sig?.value ?? Buffer.alloc(0);
  if (sig?.batch) {
    const leaf = leafHash(envelopeSigningInput(envelope, sig.algorithm, sig.signer));
    return sha256(Buffer.concat([value, leaf]));
  }
  return sha256(value);
}

/** A new signed envelope from `identity`, with a fresh id, timestamp and 16-byte nonce. */
export function newEnvelope(identity, kind, payload, fields = {}) {
  return signEnvelope(identity, unsignedEnvelope(identity, kind, payload, fields));
}

/** The same, not signed yet (for signBatch). */
export function unsignedEnvelope(identity, kind, payload, fields = {}) {
  return {
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
    signature: null,
    ...fields,
  };
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

// Messages of one batch share one Ed25519 check: results by (signer, value, signed bytes).
const batchChecks = new Map();

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
  if (!signature.batch) {
    return verify(null, signingInput, key, signature.value) ? null : "SIGNATURE_INVALID";
  }
  let root;
  try {
    root = rootFromProof(leafHash(signingInput), signature.batch);
  } catch (err) {
    if (err instanceof SigwireCheck) return err.reason;
    throw err;
  }
  const data = batchSigningInput(signature.batch.size, root, signature.algorithm, signature.signer);
  const seen = `${author} ${Buffer.from(signature.value).toString("hex")} ${data.toString("hex")}`;
  let ok = batchChecks.get(seen);
  if (ok === undefined) {
    ok = verify(null, data, key, signature.value);
    if (batchChecks.size >= 1000) batchChecks.clear();
    batchChecks.set(seen, ok);
  }
  return ok ? null : "SIGNATURE_INVALID";
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
  if (card.signature?.batch) {
    throw new SigwireCheck("SIGNATURE_INVALID", "an agent card is never batch-signed");
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

// BatchProof: uint32 index and size are JSON numbers (strings are accepted too),
// path is a list of base64 strings. An absent proof is null, as proto-loader has it.
function batchFromJson(obj) {
  if (obj === null) return null;
  const r = reader(obj);
  return {
    index: r.num("index"),
    size: r.num("size"),
    path: r.list("path").map((hash) => Buffer.from(hash, "base64")),
  };
}

export function signatureFromJson(obj) {
  if (obj === null) return null;
  const r = reader(obj);
  return {
    signer: r.str("signer"),
    algorithm: r.str("algorithm"),
    value: r.bytes("value"),
    batch: batchFromJson(r.msg("batch")),
  };
}

export function signatureToJson(s) {
  if (!s) return undefined;
  const out = { signer: s.signer, algorithm: s.algorithm, value: b64(s.value) };
  if (s.batch) {
    out.batch = {
      index: Number(s.batch.index),
      size: Number(s.batch.size),
      path: (s.batch.path ?? []).map(b64),
    };
  }
  return out;
}

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

const hexList = (hashes) => hashes.map((h) => Buffer.from(h).toString("hex"));

/**
 * The envelopes of the vector file, signed as published, by id: the envelope
 * vectors (single signatures) and the envelopes of every batch vector (with
 * their proofs). Replies in batch vectors are checked against these.
 */
export function vectorRequests(data) {
  const requests = new Map();
  for (const v of data.envelopes ?? []) {
    const [message] = vectorMessage(v);
    const signature = { signer: v.signer_did, algorithm: ALGORITHM, value: hex(v.signature_hex) };
    requests.set(message.id, { ...message, signature });
  }
  for (const b of data.batches ?? []) {
    if (b.kind !== "envelopes") continue;
    for (const m of b.messages) {
      const [message, , algorithm] = vectorMessage(m);
      requests.set(message.id, { ...message, signature: vectorSignature(b, m, algorithm) });
    }
  }
  return requests;
}

function vectorSignature(b, m, algorithm) {
  return {
    signer: b.signer_did,
    algorithm,
    value: hex(b.signature_hex),
    batch: { index: m.proof.index, size: m.proof.size, path: m.proof.path_hex.map(hex) },
  };
}

/**
 * Checks one batch vector (docs/signing.md, "Test vectors"): the DID from the
 * seed; each message's signing input and leaf rebuilt from its fields; the
 * root, every inclusion path and the batch signing input rebuilt from the
 * messages alone; the signature reproduced; each message verified from its own
 * proof and the signature; proofs with another index, another size, a path one
 * hash shorter or longer, or another message's path rejected, as is every
 * single-byte change of a signing input; each envelope's request digest; and
 * each reply bound to its request where `requests` (vectorRequests) holds it.
 * Returns a short summary.
 */
export function checkBatchVector(b, requests = new Map()) {
  const identity = Identity.fromSeed(hex(b.signer_seed_hex));
  if (identity.did !== b.signer_did) throw new Error(`did:key ${identity.did} != ${b.signer_did}`);
  const wantKind = b.messages.every((m) => (b.kind === "envelopes" ? m.envelope : m.reply));
  if (!wantKind || !["envelopes", "replies"].includes(b.kind)) throw new Error(`kind ${b.kind}`);
  const n = b.messages.length;
  const built = b.messages.map((m, i) => {
    const [message, author, algorithm, build] = vectorMessage(m);
    if (author !== b.signer_did) throw new Error(`message ${i}: the author is not the signer`);
    const input = build(message, algorithm, b.signer_did);
    if (!input.equals(hex(m.signing_input_hex))) {
      throw new Error(`message ${i}: signing input differs`);
    }
    const leaf = leafHash(input);
    if (leaf.toString("hex") !== m.leaf_hex) throw new Error(`message ${i}: leaf differs`);
    if (m.proof.index !== i || m.proof.size !== n) {
      throw new Error(`message ${i}: proof index ${m.proof.index}, size ${m.proof.size}`);
    }
    return { m, message, author, algorithm, input, leaf };
  });
  const [root, paths] = merkleTree(built.map((x) => x.leaf));
  if (root.toString("hex") !== b.root_hex) throw new Error("root differs");
  paths.forEach((path, i) => {
    if (hexList(path).join() !== b.messages[i].proof.path_hex.join()) {
      throw new Error(`message ${i}: inclusion path differs`);
    }
  });
  const batchInput = batchSigningInput(n, root, ALGORITHM, b.signer_did);
  if (!batchInput.equals(hex(b.batch_signing_input_hex))) {
    throw new Error("batch signing input differs");
  }
  if (identity.sign(batchInput).toString("hex") !== b.signature_hex) {
    throw new Error("signature differs");
  }
  let rejected = 0;
  let bound = 0;
  const refuse = (what, signature, author, input) => {
    const reason = checkSignature(signature, author, input);
    if (reason !== "SIGNATURE_INVALID") throw new Error(`${what}: ${reason ?? "verifies"}`);
    rejected++;
  };
  // A proof that cannot fit its tree is refused by the proof check itself
  // (section 6.1 step 6), before any Ed25519 verification.
  const misfit = (what, signature, leaf) => {
    try {
      rootFromProof(leaf, signature.batch);
    } catch (err) {
      if (err instanceof SigwireCheck && err.reason === "SIGNATURE_INVALID") return;
      throw err;
    }
    throw new Error(`${what}: the proof check let it through`);
  };
  for (const [i, { m, message, author, algorithm, input, leaf }] of built.entries()) {
    const signature = vectorSignature(b, m, algorithm);
    const reason = checkSignature(signature, author, input);
    if (reason !== null) throw new Error(`message ${i} does not verify: ${reason}`);
    const proof = signature.batch;
    const other = (change) => ({ ...signature, batch: { ...proof, ...change } });
    for (let index = 0; index <= n; index++) {
      if (index !== i) refuse(`message ${i} as index ${index}`, other({ index }), author, input);
    }
    misfit(`message ${i} as index ${n}`, other({ index: n }), leaf);
    for (const size of [0, n - 1, n + 1, 2 * n, MAX_BATCH_SIZE + 1]) {
      if (size !== n) refuse(`message ${i} with size ${size}`, other({ size }), author, input);
    }
    for (const size of [0, MAX_BATCH_SIZE + 1]) {
      misfit(`message ${i} with size ${size}`, other({ size }), leaf);
    }
    const longer = other({ path: [...proof.path, root] });
    refuse(`message ${i}, path one longer`, longer, author, input);
    misfit(`message ${i}, path one longer`, longer, leaf);
    if (proof.path.length > 0) {
      const shorter = other({ path: proof.path.slice(0, -1) });
      refuse(`message ${i}, path one shorter`, shorter, author, input);
      misfit(`message ${i}, path one shorter`, shorter, leaf);
    }
    const short = other({ path: proof.path.map((h, k) => (k === 0 ? h.subarray(0, 31) : h)) });
    if (proof.path.length > 0) misfit(`message ${i}, a 31-byte hash`, short, leaf);
    const deep = other({ path: Array(17).fill(root) });
    misfit(`message ${i}, 17 hashes`, deep, leaf);
    for (let j = 0; j < n; j++) {
      if (j === i || b.messages[j].proof.path_hex.join() === m.proof.path_hex.join()) continue;
      const path = b.messages[j].proof.path_hex.map(hex);
      refuse(`message ${i} with the path of ${j}`, other({ path }), author, input);
    }
    for (let k = 0; k < input.length; k++) {
      const tampered = Buffer.from(input);
      tampered[k] ^= 0x01;
      refuse(`message ${i} with byte ${k} flipped`, signature, author, tampered);
    }
    const signedMessage = { ...message, signature };
    if (m.envelope) {
      const digest = requestDigest(signedMessage).toString("hex");
      if (digest !== m.request_digest_hex) throw new Error(`message ${i}: request digest differs`);
      const single = sha256(hex(b.signature_hex)).toString("hex");
      if (digest === single) throw new Error(`message ${i}: digest ignores the leaf`);
    } else if (requests.has(message.requestId)) {
      verifyReply(signedMessage, requests.get(message.requestId), b.signer_did);
      bound++;
    }
  }
  const replies = b.kind === "replies" ? `, ${bound} bound to their requests` : "";
  return `${n} messages, ${rejected} altered proofs and inputs rejected${replies}`;
}
