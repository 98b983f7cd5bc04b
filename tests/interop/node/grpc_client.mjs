// A sigwire client over gRPC in Node, written from docs/signing.md and
// docs/protocol.md alone: it loads protos/sigwire_pb/v1/transport.proto at run
// time (no generated code), signs with a fresh Ed25519 key, and verifies every
// reply, card and push it receives.
//
//   node tests/interop/node/grpc_client.mjs grpc://127.0.0.1:50051 did:key:z6Mk...
//
// The DID is the agent's, as its operator published it: replies and the card
// must come from it. Prints "did <our DID>", then one line per check, and ends
// with "N passed, M failed"; exits 1 if any check failed. The agent is expected
// to push one envelope of kind "ask" to this client on its Connect stream
// (tests/interop/agent.py does), which this client answers "answer: <payload>".

import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

import {
  Checks,
  checkBatchSignedEnvelopes,
  checkNoBatchProofs,
  checkPipelinedBatch,
  checkPushAnswered,
  checkTamperedBatchProof,
  checkTamperedEnvelope,
  ConnectSession,
  expect,
  expectData,
  TIMEOUT_MS,
  within,
} from "./connect.mjs";
import {
  checkBatchVector,
  checkVector,
  didFromPublicKey,
  Identity,
  newEnvelope,
  publicKeyFromDid,
  SigwireCheck,
  vectorRequests,
  verifyCard,
  verifyReply,
} from "./sigwire.mjs";

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, "..", "..", "..");
const SIGWIRE_PROTOS = resolve(ROOT, "protos");
const LOCAL_PROTOS = resolve(HERE, "protos");
const VECTORS = resolve(ROOT, "tests", "vectors", "signing.json");
const DOMAIN = "sigwire.dev";

const [target, serverDid] = process.argv.slice(2);
if (!target || !serverDid) {
  console.error("usage: node grpc_client.mjs grpc://HOST:PORT SERVER_DID");
  process.exit(2);
}
const url = target.includes("://") ? target : `grpc://${target}`;
const address = url.replace(/^grpc:\/\//, "");

// --- the contract, loaded from the .proto files ------------------------------------

const LOAD_OPTIONS = { longs: String, enums: String, defaults: true, oneofs: true };
const sigwirePkg = grpc.loadPackageDefinition(
  protoLoader.loadSync("sigwire_pb/v1/transport.proto", {
    ...LOAD_OPTIONS,
    includeDirs: [SIGWIRE_PROTOS],
  }),
).sigwire.v1;
const healthPkg = grpc.loadPackageDefinition(
  protoLoader.loadSync("grpc/health/v1/health.proto", {
    ...LOAD_OPTIONS,
    includeDirs: [LOCAL_PROTOS],
  }),
).grpc.health.v1;
// google.rpc.Status and ErrorInfo, to read the grpc-status-details-bin trailer.
const rpcTypes = protobuf.loadSync([
  resolve(LOCAL_PROTOS, "google", "rpc", "status.proto"),
  resolve(LOCAL_PROTOS, "google", "rpc", "error_details.proto"),
]);
const StatusType = rpcTypes.lookupType("google.rpc.Status");

const credentials = grpc.credentials.createInsecure();
const agent = new sigwirePkg.AgentTransport(address, credentials);
const health = new healthPkg.Health(address, credentials);
const deadline = () => Date.now() + TIMEOUT_MS;

function unary(client, method, request) {
  return new Promise((ok, fail) => {
    client[method](request, { deadline: deadline() }, (err, response) =>
      err ? fail(err) : ok(response),
    );
  });
}

function serverStream(request) {
  return new Promise((ok, fail) => {
    const parts = [];
    const call = agent.SendStream(request, { deadline: deadline() });
    call.on("data", (reply) => parts.push(reply));
    call.on("error", fail);
    call.on("end", () => ok(parts));
  });
}

/** The google.rpc.ErrorInfo in a failed call's grpc-status-details-bin trailer. */
function errorInfo(err) {
  const [raw] = err.metadata?.get("grpc-status-details-bin") ?? [];
  expect(raw !== undefined, "no grpc-status-details-bin trailer");
  const status = StatusType.decode(raw);
  expect(
    status.code === err.code,
    `google.rpc.Status code ${status.code} != gRPC status ${err.code}`,
  );
  for (const any of status.details) {
    if (any.type_url === "type.googleapis.com/google.rpc.ErrorInfo") {
      return rpcTypes.lookupType("google.rpc.ErrorInfo").decode(any.value);
    }
  }
  throw new Error("no google.rpc.ErrorInfo in the status details");
}

/** A Connect call driven by a ConnectSession; `status` resolves with the call's final status. */
function openConnect(options) {
  const stream = agent.Connect();
  const session = new ConnectSession({ ...options, send: (frame) => stream.write(frame) });
  const status = new Promise((ok) => stream.on("status", ok));
  stream.on("data", (frame) => session.receive(frame));
  stream.on("error", (err) => session.ended(err));
  stream.on("end", () => session.ended(null));
  return { stream, session, status };
}

/** Checks that `promise` fails with gRPC status `code` and ErrorInfo `reason`. */
async function expectRefusal(promise, code, reason) {
  let err;
  try {
    await promise;
  } catch (caught) {
    err = caught;
  }
  expect(err !== undefined, "the call succeeded");
  expect(
    err.code === grpc.status[code],
    `status ${grpc.status[err.code]} (${err.details}), expected ${code}`,
  );
  const info = errorInfo(err);
  expect(info.reason === reason, `ErrorInfo reason ${info.reason}, expected ${reason}`);
  expect(info.domain === DOMAIN, `ErrorInfo domain ${info.domain}, expected ${DOMAIN}`);
  return { info, note: `${code} ${reason}` };
}


// --- the checks ----------------------------------------------------------------------

const identity = Identity.generate();
console.log(`did ${identity.did}`);
const checks = new Checks();
const watchdog = setTimeout(() => {
  console.log("FAIL  the whole run timed out");
  process.exit(1);
}, 6 * TIMEOUT_MS).unref();

// Signing vectors, with the same code that signs and verifies below.
const vectors = JSON.parse(readFileSync(VECTORS, "utf8"));
for (const [type, label] of [
  ["envelopes", "envelope"],
  ["replies", "reply"],
  ["cards", "card"],
]) {
  for (const v of vectors[type]) {
    await checks.run(`signing vector ${label} ${JSON.stringify(v.name)}`, () => {
      const size = checkVector(v);
      return `${size}-byte signing input, ${size} tampered copies rejected`;
    });
  }
}
const requests = vectorRequests(vectors);
for (const v of vectors.batches ?? []) {
  await checks.run(`signing vector batch ${JSON.stringify(v.name)}`, () =>
    checkBatchVector(v, requests),
  );
}
await checks.run("weak and non-canonical did:key refused (DID_INVALID)", () => {
  const weak = [
    "0100000000000000000000000000000000000000000000000000000000000000", // neutral element
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", // order 2
    "0000000000000000000000000000000000000000000000000000000000000000", // order 4
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", // y = p: not canonical
  ];
  for (const key of weak) {
    const did = didFromPublicKey(Buffer.from(key, "hex"));
    let reason = null;
    try {
      publicKeyFromDid(did);
    } catch (err) {
      reason = err.reason;
    }
    expect(reason === "DID_INVALID", `${key} resolved (${reason})`);
  }
  expect(publicKeyFromDid(identity.did).equals(identity.publicKey), "our own DID does not resolve");
  return `${weak.length} keys`;
});

await checks.run("grpc.health.v1 Check", async () => {
  for (const service of ["", "sigwire.v1.AgentTransport"]) {
    const { status } = await unary(health, "Check", { service });
    expect(status === "SERVING", `${JSON.stringify(service)} is ${status}`);
  }
  return "SERVING for '' and sigwire.v1.AgentTransport";
});

let card = null;
await checks.run("Describe: card signed by the agent", async () => {
  card = await unary(agent, "Describe", {});
  verifyCard(card, serverDid);
  expect(card.protocolVersion === "sigwire/1", `protocol_version ${card.protocolVersion}`);
  expect(card.endpoints.includes(url), `endpoints ${card.endpoints} lack ${url}`);
  for (const kind of ["echo", "count"])
    expect(card.kinds.includes(kind), `kinds ${card.kinds} lack ${kind}`);
  return `kinds ${card.kinds.join(", ")}; max_message_size ${card.maxMessageSize}`;
});

await checks.run("Send echo: signed reply bound to the request", async () => {
  const request = newEnvelope(identity, "echo", "hello from node", {
    recipient: serverDid,
    metadata: { lang: "js" },
  });
  const reply = await unary(agent, "Send", request);
  verifyReply(reply, request, serverDid);
  expectData(reply, "hello from node");
  expect(reply.final && reply.sequence === "0", `final ${reply.final}, sequence ${reply.sequence}`);
});

await checks.run(
  "Send: exact re-send answered from the reply cache; nonce reuse is REPLAY",
  async () => {
    const request = newEnvelope(identity, "echo", "once", { recipient: serverDid });
    const first = await unary(agent, "Send", request);
    const again = await unary(agent, "Send", request);
    verifyReply(again, request, serverDid);
    expectData(again, "once");
    expect(
      again.createdAtMs === first.createdAtMs,
      "the re-send got a new answer, not the cached one",
    );
    const reused = newEnvelope(identity, "echo", "twice", {
      recipient: serverDid,
      nonce: request.nonce,
    });
    return (await expectRefusal(unary(agent, "Send", reused), "UNAUTHENTICATED", "REPLAY")).note;
  },
);

await checks.run("SendStream count: every part verified, in order", async () => {
  const request = newEnvelope(identity, "count", "5", { recipient: serverDid });
  const parts = await serverStream(request);
  expect(parts.length === 6, `${parts.length} parts, expected 5 and a final one`);
  parts.forEach((part, i) => {
    verifyReply(part, request, serverDid);
    expect(part.sequence === String(i), `part ${i} has sequence ${part.sequence}`);
    expect(part.final === (i === 5), `part ${i} final=${part.final}`);
    if (i < 5) expectData(part, String(i));
    else expect(part.success && part.data.length === 0, "the final part carries data");
  });
  return "0 1 2 3 4 + final";
});

await checks.run("tampered payload refused", async () => {
  const request = newEnvelope(identity, "echo", "signed", { recipient: serverDid });
  const tampered = { ...request, payload: Buffer.from("changed after signing") };
  return (
    await expectRefusal(unary(agent, "Send", tampered), "UNAUTHENTICATED", "SIGNATURE_INVALID")
  ).note;
});

await checks.run("unsigned envelope refused", async () => {
  const request = {
    ...newEnvelope(identity, "echo", "x", { recipient: serverDid }),
    signature: null,
  };
  return (
    await expectRefusal(unary(agent, "Send", request), "UNAUTHENTICATED", "SIGNATURE_MISSING")
  ).note;
});

await checks.run("small-order did:key sender refused", async () => {
  const weakDid = didFromPublicKey(Buffer.from("01".padEnd(64, "0"), "hex"));
  const signed = newEnvelope(identity, "echo", "x", { recipient: serverDid });
  const forged = {
    ...signed,
    sender: weakDid,
    signature: { ...signed.signature, signer: weakDid },
  };
  return (await expectRefusal(unary(agent, "Send", forged), "UNAUTHENTICATED", "DID_INVALID")).note;
});

await checks.run("unknown kind refused", async () => {
  const request = newEnvelope(identity, "no.such.kind", "", { recipient: serverDid });
  return (await expectRefusal(unary(agent, "Send", request), "UNIMPLEMENTED", "KIND_UNKNOWN")).note;
});

await checks.run("envelope for another agent refused", async () => {
  const request = newEnvelope(identity, "echo", "", { recipient: identity.did });
  const { info, note } = await expectRefusal(
    unary(agent, "Send", request),
    "PERMISSION_DENIED",
    "RECIPIENT_MISMATCH",
  );
  expect(info.metadata.recipient === identity.did, `details ${JSON.stringify(info.metadata)}`);
  return note;
});

await checks.run("Send on a streaming kind refused", async () => {
  const request = newEnvelope(identity, "count", "2", { recipient: serverDid });
  return (
    await expectRefusal(unary(agent, "Send", request), "FAILED_PRECONDITION", "STREAMING_KIND")
  ).note;
});

// --- Connect ---------------------------------------------------------------------------

const { stream: call, session, status: finalStatus } = openConnect({ identity, serverDid });
session.on("ask", (envelope) => `answer: ${envelope.payload.toString("utf8")}`);

const connected = await checks.run("Connect hello: the agent's size limit, signed", async () => {
  const reply = await session.hello();
  expect(reply.responder === serverDid, `responder ${reply.responder}`);
  expectData(reply, String(card?.maxMessageSize ?? reply.data));
  return `max payload ${reply.data} bytes`;
});

if (connected) {
  await checks.run("Connect: echo and a streamed count, interleaved", async () => {
    const [echo, count] = await Promise.all([
      session.request("echo", "over connect"),
      session.request("count", "3"),
    ]);
    expect(echo.length === 1, `${echo.length} echo replies`);
    expectData(echo[0], "over connect");
    expect(count.map((r) => r.data.toString()).join(",") === "0,1,2,", "count parts");
    return "every reply verified";
  });

  await checks.run(
    "Connect: push of kind ask verified and answered",
    () => checkPushAnswered(session),
  );

  await checks.run(
    "Connect: tampered envelope gets a signed SIGNATURE_INVALID reply",
    () => checkTamperedEnvelope(session, identity, serverDid),
  );

  await checks.run(
    "Connect: one frame of batch-signed envelopes, every one accepted",
    () => checkBatchSignedEnvelopes(session, identity, serverDid),
  );

  await checks.run(
    "Connect: a batch proof with a wrong index gets SIGNATURE_INVALID, its siblings are answered",
    () => checkTamperedBatchProof(session, identity, serverDid),
  );

  await checks.run("Connect: acks and frame sequence numbers", async () => {
    const acked = await session.allAcked();
    expect(session.sequenceProblems.length === 0, session.sequenceProblems.join("; "));
    return `we sent ${session.sent} messages, the agent acked ${acked}; it sent ${session.received}`;
  });

  await checks.run("Connect: hello without sigwire.batch-signatures: nothing batch-signed", () =>
    checkNoBatchProofs(session),
  );

  await checks.run("Connect: half-close ends the call with OK", async () => {
    call.end();
    const status = await within(finalStatus, "the end of the Connect call");
    expect(status.code === grpc.status.OK, `status ${grpc.status[status.code]}: ${status.details}`);
  });
} else {
  call.cancel();
}

// A second stream whose hello accepts batch signatures.
const batched = openConnect({ identity, serverDid, batchSignatures: true });
const batchedHello = await checks.run(
  'Connect with "sigwire.batch-signatures": "1" in the hello',
  async () => {
    const reply = await batched.session.hello();
    expect(reply.responder === serverDid, `responder ${reply.responder}`);
  },
);
if (batchedHello) {
  await checks.run("Connect: 40 pipelined requests, replies batch-signed and verified", () =>
    checkPipelinedBatch(batched.session, identity, serverDid),
  );
  await checks.run("Connect (batch signatures): acks, sequence numbers, half-close", async () => {
    const acked = await batched.session.allAcked();
    const { session: s } = batched;
    expect(s.sequenceProblems.length === 0, s.sequenceProblems.join("; "));
    batched.stream.end();
    const status = await within(batched.status, "the end of the Connect call");
    expect(status.code === grpc.status.OK, `status ${grpc.status[status.code]}: ${status.details}`);
    return `${s.batchSigned} of ${s.received} messages received were batch-signed; acked ${acked}`;
  });
} else {
  batched.stream.cancel();
}

agent.close();
health.close();
clearTimeout(watchdog);
process.exitCode = checks.finish();
