// A sigwire client over WebSocket in Node, with the JSON subprotocol
// "sigwire.v1.json": no protobuf library at all, each Frame is one text
// message in protobuf's canonical JSON mapping (docs/protocol.md section 3).
// Written from docs/signing.md and docs/protocol.md alone.
//
//   node tests/interop/node/ws_client.mjs ws://127.0.0.1:8765/sigwire/v1 did:key:z6Mk...
//
// Prints "did <our DID>", then one line per check, and ends with
// "N passed, M failed"; exits 1 if any check failed. The agent is expected to
// push one envelope of kind "ask" to this client (tests/interop/agent.py does).

import WebSocket from "ws";

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
  cardFromJson,
  frameFromJson,
  frameToJson,
  Identity,
  newEnvelope,
  SigwireCheck,
  verifyCard,
} from "./sigwire.mjs";

const SUBPROTOCOL = "sigwire.v1.json";

const [target, serverDid] = process.argv.slice(2);
if (!target || !serverDid) {
  console.error("usage: node ws_client.mjs ws://HOST:PORT/sigwire/v1 SERVER_DID");
  process.exit(2);
}

/** Opens a WebSocket offering `subprotocols`; resolves once the handshake completed. */
function open(subprotocols) {
  const ws = new WebSocket(target, subprotocols);
  const closed = new Promise((ok) =>
    ws.on("close", (code, reason) => ok({ code, reason: reason.toString() })),
  );
  const opened = new Promise((ok, fail) => {
    ws.once("open", ok);
    ws.once("error", fail);
  });
  return within(opened, "the WebSocket handshake").then(() => ({ ws, closed }));
}

/** A sigwire.v1.json connection driven by a ConnectSession; `problems` lists protocol faults. */
async function openSession(options) {
  const { ws, closed } = await open([SUBPROTOCOL]);
  const problems = [];
  const session = new ConnectSession({ ...options, send: (frame) => ws.send(frameToJson(frame)) });
  ws.on("message", (data, isBinary) => {
    if (isBinary) problems.push("a binary message on the JSON subprotocol");
    else session.receive(frameFromJson(data.toString("utf8")));
  });
  closed.then(({ code, reason }) => session.ended(new Error(`closed ${code} ${reason}`)));
  return { ws, closed, session, problems };
}


const identity = Identity.generate();
console.log(`did ${identity.did}`);
const checks = new Checks();
const watchdog = setTimeout(() => {
  console.log("FAIL  the whole run timed out");
  process.exit(1);
}, 6 * TIMEOUT_MS).unref();

await checks.run("GET /.well-known/sigwire-agent.json: card signed by the agent", async () => {
  const url = new URL("/.well-known/sigwire-agent.json", target.replace(/^ws/, "http"));
  const response = await within(fetch(url), "the agent card");
  expect(response.ok, `HTTP ${response.status}`);
  const card = cardFromJson(await response.json());
  verifyCard(card, serverDid);
  expect(card.endpoints.includes(target), `endpoints ${card.endpoints} lack ${target}`);
  return `endpoints ${card.endpoints.join(", ")}`;
});

let connection = null;
await checks.run(`WebSocket handshake picks ${SUBPROTOCOL}`, async () => {
  connection = await openSession({ identity, serverDid });
  expect(
    connection.ws.protocol === SUBPROTOCOL,
    `subprotocol ${JSON.stringify(connection.ws.protocol)}`,
  );
});

if (connection !== null) {
  const { ws, closed, session, problems } = connection;
  session.on("ask", (envelope) => `answer: ${envelope.payload.toString("utf8")}`);

  const helloOk = await checks.run("hello: the agent's size limit, signed", async () => {
    const reply = await session.hello();
    expect(reply.responder === serverDid, `responder ${reply.responder}`);
    expect(
      /^[1-9][0-9]*$/.test(reply.data.toString()),
      `data ${JSON.stringify(reply.data.toString())}`,
    );
    return `max payload ${reply.data} bytes`;
  });

  if (helloOk) {
    await checks.run("echo: signed reply bound to the request", async () => {
      const metadata = { lang: "js", "\u00e9": "accent", Z: "" };
      const [reply, ...rest] = await session.request("echo", "h\u00e9llo over JSON", { metadata });
      expect(rest.length === 0, "more than one reply");
      expectData(reply, "h\u00e9llo over JSON");
      expect(reply.final, "not final");
    });

    await checks.run("count: streamed parts verified, in order", async () => {
      const parts = await session.request("count", "4");
      const data = parts.map((part) => part.data.toString());
      expect(data.join(",") === "0,1,2,3,", `parts ${JSON.stringify(data)}`);
      expect(parts.at(-1).final && parts.at(-1).sequence === "4", "the last part is not final");
      return "0 1 2 3 + final";
    });

    await checks.run(
      "push of kind ask verified and answered",
      () => checkPushAnswered(session),
    );

    await checks.run(
      "tampered envelope gets a signed SIGNATURE_INVALID reply",
      () => checkTamperedEnvelope(session, identity, serverDid),
    );

    await checks.run(
      "one frame of batch-signed envelopes (JSON batch proofs), every one accepted",
      () => checkBatchSignedEnvelopes(session, identity, serverDid),
    );

    await checks.run(
      "a batch proof with a wrong index gets SIGNATURE_INVALID, its siblings are answered",
      () => checkTamperedBatchProof(session, identity, serverDid),
    );

    await checks.run("acks, frame sequence numbers, text messages only", async () => {
      const acked = await session.allAcked();
      expect(session.sequenceProblems.length === 0, session.sequenceProblems.join("; "));
      expect(problems.length === 0, problems.join("; "));
      return `we sent ${session.sent} messages, the agent acked ${acked}; it sent ${session.received}`;
    });

    await checks.run("hello without sigwire.batch-signatures: nothing batch-signed", () =>
      checkNoBatchProofs(session),
    );
  }

  await checks.run("close 1000", async () => {
    ws.close(1000);
    const { code } = await within(closed, "the close handshake");
    expect(code === 1000, `close code ${code}`);
  });
}

// A second connection whose hello accepts batch signatures.
let batched = null;
const batchedHello = await checks.run('hello with "sigwire.batch-signatures": "1"', async () => {
  batched = await openSession({ identity, serverDid, batchSignatures: true });
  const reply = await batched.session.hello();
  expect(reply.responder === serverDid, `responder ${reply.responder}`);
});
if (!batchedHello) batched?.ws.terminate();
else {
  const { ws, closed, session, problems } = batched;
  await checks.run("40 pipelined requests, replies batch-signed (JSON) and verified", () =>
    checkPipelinedBatch(session, identity, serverDid),
  );
  await checks.run("batch signatures: acks, sequence numbers, close 1000", async () => {
    const acked = await session.allAcked();
    expect(session.sequenceProblems.length === 0, session.sequenceProblems.join("; "));
    expect(problems.length === 0, problems.join("; "));
    ws.close(1000);
    const { code } = await within(closed, "the close handshake");
    expect(code === 1000, `close code ${code}`);
    const signed = `${session.batchSigned} of ${session.received} messages received batch-signed`;
    return `${signed}; acked ${acked}`;
  });
}

await checks.run(
  "a binary message on sigwire.v1.json closes with 1003 UNSUPPORTED_DATA",
  async () => {
    const { ws, closed } = await open([SUBPROTOCOL]);
    ws.send(Buffer.from([0x0a, 0x00]));
    const { code, reason } = await within(closed, "the close");
    expect(
      code === 1003 && reason.startsWith("UNSUPPORTED_DATA"),
      `closed ${code} ${JSON.stringify(reason)}`,
    );
    return `${code} ${JSON.stringify(reason)}`;
  },
);

clearTimeout(watchdog);
process.exitCode = checks.finish();
