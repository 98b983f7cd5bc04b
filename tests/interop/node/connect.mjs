// The client side of a sigwire Connect stream (docs/protocol.md section 2),
// independent of the transport: grpc_client.mjs runs it over gRPC Connect,
// ws_client.mjs over a WebSocket with JSON frames. Also the check runner both
// programs print their results with.

import {
  HELLO_KIND,
  newEnvelope,
  replyTo,
  SigwireCheck,
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
  constructor({ identity, serverDid, send }) {
    this.identity = identity;
    this.serverDid = serverDid;
    this.send = send;
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
    const [reply] = await this.request(HELLO_KIND, "", { recipient: this.serverDid });
    return reply;
  }

  /** Sends one request; resolves with its verified replies, the last one final. */
  request(kind, payload, fields = {}) {
    return this.requestEnvelope(
      newEnvelope(this.identity, kind, payload, { recipient: this.serverDid, ...fields }),
    );
  }

  requestEnvelope(envelope) {
    const call = new Call(envelope);
    this.calls.set(envelope.id, call);
    this.sendMessages("envelopes", [envelope]);
    return within(call.done, `the reply to ${envelope.kind}`);
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
