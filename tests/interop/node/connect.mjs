// The client side of a sigwire Connect stream (docs/protocol.md section 2),
// independent of the transport: grpc_client.mjs runs it over gRPC Connect,
// ws_client.mjs over a WebSocket with JSON frames. Also the check runner both
// programs print their results with.

import {
  BATCH_SIGNATURES_KEY,
  HELLO_KIND,
  newEnvelope,
  replyTo,
  SigwireCheck,
  signBatch,
  unsignedEnvelope,
  verifyEnvelope,
  verifyReply,
} from "./sigwire.mjs";

export const TIMEOUT_MS = 10_000 * Number(process.env.SIGWIRE_TEST_TIMEOUT_SCALE ?? "1");

/** Resolves with `promise`, or rejects after `ms` milliseconds naming `what`. */
export function within(promise, what, ms = TIMEOUT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

export function expect(condition, problem) {
  if (!condition) throw new Error(problem);
}

/** Runs named checks, prints one line each, and the closing "N passed, M failed" line. */
/** The reply succeeded and carries exactly `text`. */
export function expectData(reply, text) {
  expect(reply.success, `success is false: ${reply.error?.reason}`);
  expect(
    reply.data.toString("utf8") === text,
    `data ${JSON.stringify(reply.data.toString())} != ${JSON.stringify(text)}`,
  );
}

/** The agent's push of kind "ask" was verified and answered (either transport). */
export async function checkPushAnswered(session) {
  const push = await session.nextPush();
  expect(push.envelope.kind === "ask", `kind ${push.envelope.kind}`);
  expect(
    push.reply.success,
    `our reply was an error: ${push.reply.error?.reason} ${push.reply.error?.message}`,
  );
  // Frames are read in order: once this answer is here, the agent has our reply.
  expectData((await session.request("echo", "after the push"))[0], "after the push");
  return `${JSON.stringify(push.envelope.payload.toString())} -> ${JSON.stringify(push.reply.data.toString())}`;
}

/** An envelope changed after signing gets a signed SIGNATURE_INVALID reply; the stream goes on. */
export async function checkTamperedEnvelope(session, identity, serverDid) {
  const request = newEnvelope(identity, "echo", "signed", { recipient: serverDid });
  let err = null;
  try {
    await session.requestEnvelope({ ...request, payload: Buffer.from("changed") });
  } catch (caught) {
    err = caught;
  }
  expect(err instanceof SigwireCheck && err.reply, `no error reply: ${err?.message}`);
  expect(err.reason === "SIGNATURE_INVALID", `reason ${err.reason}`);
  expectData((await session.request("echo", "still open"))[0], "still open");
  return "and the stream goes on";
}

/** `count` echo envelopes signed with one batch signature (docs/signing.md 4.5). */
function echoBatch(identity, serverDid, count, label) {
  const envelopes = [];
  for (let i = 0; i < count; i++) {
    envelopes.push(unsignedEnvelope(identity, "echo", `${label} ${i}`, { recipient: serverDid }));
  }
  return signBatch(identity, envelopes);
}

/** One frame of batch-signed envelopes: the agent accepts and answers every one. */
export async function checkBatchSignedEnvelopes(session, identity, serverDid, count = 20) {
  const batch = echoBatch(identity, serverDid, count, "batched");
  const answers = await Promise.all(session.requestMany(batch));
  answers.forEach((replies, i) => {
    expect(replies.length === 1, `${replies.length} replies to envelope ${i}`);
    expectData(replies[0], `batched ${i}`);
  });
  return `${count} envelopes under one signature, ${count} verified answers`;
}

/**
 * A batch-signed frame in which one envelope's proof names another index: the
 * agent answers that one with a signed SIGNATURE_INVALID reply, its siblings normally.
 */
export async function checkTamperedBatchProof(session, identity, serverDid) {
  const batch = echoBatch(identity, serverDid, 3, "sibling");
  const bad = batch[1];
  const wrongIndex = { ...bad.signature.batch, index: 0 };
  batch[1] = { ...bad, signature: { ...bad.signature, batch: wrongIndex } };
  const [first, tampered, last] = await Promise.allSettled(session.requestMany(batch));
  for (const [i, outcome] of [[0, first], [2, last]]) {
    expect(outcome.status === "fulfilled", `sibling ${i} failed: ${outcome.reason?.message}`);
    expectData(outcome.value[0], `sibling ${i}`);
  }
  const err = tampered.reason;
  expect(tampered.status === "rejected", "the envelope with the wrong index was accepted");
  expect(err instanceof SigwireCheck && err.reply, `no error reply: ${err?.message}`);
  expect(err.reason === "SIGNATURE_INVALID", `reason ${err.reason}`);
  return "index 1 sent as 0: SIGNATURE_INVALID; indexes 0 and 2 answered";
}

/**
 * On a session whose hello declared batch signatures: `count` requests in one
 * frame (itself batch-signed), every reply verified, and some of them
 * batch-signed by the agent, which writes replies produced together in one frame.
 */
export async function checkPipelinedBatch(session, identity, serverDid, count = 40) {
  const batch = echoBatch(identity, serverDid, count, "pipelined");
  const answers = await Promise.all(session.requestMany(batch));
  const sizes = [];
  answers.forEach((replies, i) => {
    expect(replies.length === 1, `${replies.length} replies to request ${i}`);
    expectData(replies[0], `pipelined ${i}`);
    const proof = replies[0].signature.batch;
    if (proof) sizes.push(Number(proof.size));
  });
  const shared = sizes.filter((size) => size > 1).length;
  expect(shared > 0, `none of the ${count} replies was batch-signed (batch.size > 1)`);
  return `${count} replies verified, ${shared} batch-signed, largest batch ${Math.max(...sizes)}`;
}

/** A session that did not declare batch signatures never received one. */
export function checkNoBatchProofs(session) {
  expect(
    session.batchSigned === 0,
    `${session.batchSigned} of ${session.received} messages carried a batch proof`,
  );
  return `${session.received} messages received, each signed alone`;
}

export class Checks {
  constructor() {
    this.passed = 0;
    this.failed = 0;
  }

  async run(name, check) {
    try {
      const note = await check();
      this.passed++;
      console.log(`ok    ${name}${note ? ` (${note})` : ""}`);
      return true;
    } catch (err) {
      this.failed++;
      console.log(`FAIL  ${name}: ${err?.message ?? err}`);
      return false;
    }
  }

  finish() {
    console.log(`${this.passed} passed, ${this.failed} failed`);
    return this.failed === 0 && this.passed > 0 ? 0 : 1;
  }
}

/** One outstanding request on the stream: its envelope and the replies so far. */
class Call {
  constructor(envelope) {
    this.envelope = envelope;
    this.replies = [];
    this.done = new Promise((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
  }
}

/**
 * A Connect stream seen from the client. The transport calls `receive(frame)`
 * for every inbound Frame and `ended(error)` when the stream ends; the session
 * calls `send(frame)` with Frames in proto-loader's object shape.
 *
 * Every inbound reply is verified (binding to its request, responder pinned to
 * `serverDid`, signature) before it is used; part `sequence` numbers must
 * arrive in order. Every inbound envelope (a push) is verified too, then
 * answered by the handler registered for its kind with a signed reply.
 */
export class ConnectSession {
  /**
   * `batchSignatures`: the hello declares that this client accepts batch
   * signatures (docs/signing.md 4.5), so the agent may batch-sign what it sends.
   * Inbound batch signatures are verified either way.
   */
  constructor({ identity, serverDid, send, batchSignatures = false }) {
    this.identity = identity;
    this.serverDid = serverDid;
    this.send = send;
    this.batchSignatures = batchSignatures;
    this.batchSigned = 0; // received envelopes and replies that carried a batch proof
    this.handlers = new Map();
    this.calls = new Map();
    this.pushes = [];
    this.pushWaiters = [];
    this.sent = 0; // envelopes and replies sent: our frames' sequence numbers
    this.received = 0; // the peer's count, checked against its frames' sequence numbers
    this.sequenceProblems = [];
    this.acked = 0n;
    this.ackWaiters = [];
    this.pings = 0;
    this.goaway = null;
    this.closed = false;
  }

  on(kind, handler) {
    this.handlers.set(kind, handler);
  }

  /** Sends the hello (kind sigwire.hello, empty payload) and returns its verified reply. */
  async hello() {
    const metadata = this.batchSignatures ? { [BATCH_SIGNATURES_KEY]: "1" } : {};
    const [reply] = await this.request(HELLO_KIND, "", { recipient: this.serverDid, metadata });
    return reply;
  }

  /** Sends one request; resolves with its verified replies, the last one final. */
  request(kind, payload, fields = {}) {
    return this.requestEnvelope(
      newEnvelope(this.identity, kind, payload, { recipient: this.serverDid, ...fields }),
    );
  }

  requestEnvelope(envelope) {
    return this.requestMany([envelope])[0];
  }

  /** Sends signed `envelopes` in one frame; one promise of verified replies per envelope. */
  requestMany(envelopes) {
    const calls = envelopes.map((envelope) => {
      const call = new Call(envelope);
      this.calls.set(envelope.id, call);
      return call;
    });
    this.sendMessages("envelopes", envelopes);
    return calls.map((call) => within(call.done, `the reply to ${call.envelope.kind}`));
  }

  /** Resolves with the next push this session answers (or one already answered). */
  nextPush() {
    const push = this.pushes.find((p) => !p.taken);
    if (push) {
      push.taken = true;
      return Promise.resolve(push);
    }
    return within(
      new Promise((resolve) => this.pushWaiters.push(resolve)),
      "a push from the server",
    );
  }

  /** Resolves once the peer has acknowledged every message this session sent so far. */
  allAcked() {
    const want = BigInt(this.sent);
    if (this.acked >= want) return Promise.resolve(this.acked);
    return within(
      new Promise((resolve) => this.ackWaiters.push([want, resolve])),
      `an ack of ${want}`,
    );
  }

  sendMessages(kind, messages) {
    this.sent += messages.length;
    const frame = { sequence: String(this.sent) };
    frame[kind] = { [kind]: messages };
    this.send(frame);
  }

  receive(frame) {
    // An ack may ride on any frame (Frame.acked), or come alone (body "ack").
    if (frame.acked !== undefined && BigInt(frame.acked) > 0n) this.takeAck(BigInt(frame.acked));
    switch (frame.body) {
      case "envelopes":
      case "replies": {
        const messages = frame[frame.body][frame.body];
        this.received += messages.length;
        this.batchSigned += messages.filter((m) => m.signature?.batch).length;
        if (BigInt(frame.sequence) !== BigInt(this.received)) {
          this.sequenceProblems.push(`frame sequence ${frame.sequence}, expected ${this.received}`);
        }
        if (frame.body === "replies") messages.forEach((reply) => this.takeReply(reply));
        else {
          messages.forEach((envelope) => this.takeEnvelope(envelope));
          // Taken in charge as soon as the (synchronous) handlers ran.
          this.send({ ack: { sequence: String(frame.sequence) } });
        }
        break;
      }
      case "ack":
        this.takeAck(BigInt(frame.ack.sequence));
        break;
      case "ping":
        this.pings++;
        this.send({ pong: { token: frame.ping.token } });
        break;
      case "goaway":
        this.goaway = frame.goaway;
        break;
      default:
        break;
    }
  }

  takeAck(n) {
    if (n > this.acked) this.acked = n;
    this.ackWaiters = this.ackWaiters.filter(([want, resolve]) => (n >= want ? resolve(n) : true));
  }

  takeReply(reply) {
    const call = this.calls.get(reply.requestId);
    if (call === undefined) return; // not ours, or already complete
    try {
      verifyReply(reply, call.envelope, this.serverDid);
      const want = call.replies.length;
      if (BigInt(reply.sequence) !== BigInt(want)) {
        throw new Error(`part ${reply.sequence} arrived where part ${want} was due`);
      }
    } catch (err) {
      this.calls.delete(reply.requestId);
      call.reject(err);
      return;
    }
    call.replies.push(reply);
    if (!reply.success) {
      this.calls.delete(reply.requestId);
      const error = new SigwireCheck(reply.error?.reason ?? "", reply.error?.message ?? "");
      error.reply = reply;
      call.reject(error);
    } else if (reply.final) {
      this.calls.delete(reply.requestId);
      call.resolve(call.replies);
    }
  }

  takeEnvelope(envelope) {
    let reply;
    try {
      verifyEnvelope(envelope, { me: this.identity.did, trusted: this.serverDid });
      const handler = this.handlers.get(envelope.kind);
      if (handler === undefined) {
        throw new SigwireCheck("KIND_UNKNOWN", `no handler for ${envelope.kind}`);
      }
      reply = replyTo(this.identity, envelope, { data: Buffer.from(handler(envelope)) });
    } catch (err) {
      const reason = err instanceof SigwireCheck ? err.reason : "HANDLER_FAILED";
      reply = replyTo(this.identity, envelope, {
        success: false,
        error: { reason, message: String(err.message), details: {} },
      });
    }
    this.sendMessages("replies", [reply]);
    const push = { envelope, reply, taken: false };
    this.pushes.push(push);
    const waiter = this.pushWaiters.shift();
    if (waiter) {
      push.taken = true;
      waiter(push);
    }
  }

  ended(error) {
    this.closed = true;
    const why = error ?? new Error("the stream ended");
    for (const call of this.calls.values()) call.reject(why);
    this.calls.clear();
  }
}
