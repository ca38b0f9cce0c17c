// The live client's recovery against a real server: a dropped connection, a `lagged` slow
// reader and an access token that expires while the connection is open. In each, the document
// the client ends with is what GET answers, and no version is skipped.
import assert from "node:assert/strict";
import { after, test } from "node:test";
import WebSocket from "ws";
import {
  createApi,
  LiveClient,
  liveUrl,
  Session,
  unwrap,
  type Api,
  type ClientMessage,
  type ServerMessage,
  type Topic,
} from "../src/index.js";
import { essays, startServer, waitFor, type TestServer } from "./harness.js";

const PASSWORD = "correct horse battery staple";
const servers: TestServer[] = [];
const closers: (() => void)[] = [];
after(async () => {
  for (const close of closers) close();
  for (const server of servers) await server.stop();
});

async function serve(options: Parameters<typeof startServer>[0]): Promise<TestServer> {
  const server = await startServer(options);
  servers.push(server);
  server.addUser("ada", "teacher", PASSWORD);
  return server;
}

/** A live client whose sockets (ws) and sent messages the test can see. */
function observed(server: TestServer, session: Session) {
  const sockets: WebSocket[] = [];
  const sent: ClientMessage[] = [];
  const received: ServerMessage[] = [];
  const live = new LiveClient({
    url: liveUrl(server.baseUrl),
    tokens: session,
    initialDelayMs: 50,
    connect: (url, protocols) => {
      const socket = new WebSocket(url, protocols);
      const send = socket.send.bind(socket);
      socket.send = ((data: string) => {
        sent.push(JSON.parse(data) as ClientMessage);
        send(data);
      }) as typeof socket.send;
      sockets.push(socket);
      return socket;
    },
    onMessage: (message) => received.push(message),
  });
  closers.push(() => live.close(), () => session.close());
  return { live, sockets, sent, received };
}

/** Follows `topic`, recording each version and whether it came whole or as a patch. */
function follow<T extends Topic>(live: LiveClient, topic: T, minPosition?: number) {
  const versions: { version: number; cause: "snapshot" | "change" }[] = [];
  const subscription = live.subscribe(topic, { update: (_, version, cause) => versions.push({ version, cause }) }, { minPosition });
  return { subscription, versions };
}

function assertContiguous(versions: { version: number; cause: string }[]) {
  for (let i = 1; i < versions.length; i++) {
    const [previous, next] = [versions[i - 1]!.version, versions[i]!];
    if (next.cause === "change") assert.equal(next.version, previous + 1, `no version skipped (at ${i})`);
    else assert.ok(next.version >= previous, `a snapshot never goes back (at ${i})`);
  }
}

async function readyBatch(api: Api, count: number, words = 300) {
  const registered = unwrap(
    await api.POST("/v1/batches", { body: { title: "Resume", course_code: "EN-102", expected_essay_count: count } }),
  );
  const id = registered.batch_id;
  const added = unwrap(
    await api.POST("/v1/batches/{id}/essays", { params: { path: { id } }, body: { essays: essays(count, words) } }),
  );
  return { id, position: added.position };
}

test("after the connection drops mid-pipeline, the client resumes with `since` and misses nothing", async () => {
  const server = await serve({ simulate: true, env: { ESSAYFLOW_SIMULATOR_LATENCY_MS: "5" } });
  const session = await Session.login({ baseUrl: server.baseUrl }, "ada", PASSWORD);
  const api = createApi({ baseUrl: server.baseUrl, session });
  const { id, position } = await readyBatch(api, 300);
  const { live, sockets, sent, received } = observed(server, session);
  const { subscription, versions } = follow(live, `batch:${id}`, position);
  await waitFor("the snapshot", () => subscription.current());

  unwrap(await api.POST("/v1/batches/{id}/pipelines", { params: { path: { id } }, body: { pipeline: "nlp" } }));
  const cutAt = subscription.current()!.version + 50;
  await waitFor("50 changes", () => subscription.current()!.version >= cutAt);
  const before = received.length;
  sockets[0]!.terminate(); // no close frame: as a network failure looks

  await waitFor("the second connection", () => sockets.length === 2 && sockets[1]!.readyState === WebSocket.OPEN);
  await waitFor("the batch to complete", () => subscription.current()?.document.status === "completed", 120_000);
  const resubscribe = sent.filter((m) => m.type === "subscribe").at(-1)!;
  assert.equal(resubscribe.type, "subscribe");
  assert.ok(
    resubscribe.type === "subscribe" && resubscribe.since !== undefined && resubscribe.since >= cutAt,
    `subscribed again with since (${JSON.stringify(resubscribe)})`,
  );
  // The history served the missed changes: no snapshot after the reconnect.
  assert.ok(
    received.slice(before).every((m) => m.type !== "snapshot"),
    "resumed from the history, not a snapshot",
  );
  assertContiguous(versions);
  const fetched = unwrap(await api.GET("/v1/batches/{id}", { params: { path: { id } } }));
  assert.equal(subscription.current()!.version, fetched.version);
  assert.deepEqual(subscription.current()!.document, fetched);
});

test("a reader too slow for its send buffer gets `lagged` and catches up without a gap", async () => {
  // A send buffer of 4 messages, and no processors: the test sends 300 results of 60 KB itself.
  const server = await serve({ env: { ESSAYFLOW_WS_SEND_BUFFER: "4" } });
  server.addUser("spellchecker", "service", "a long service password");
  const key = server.apiKey("spellchecker");
  const session = await Session.login({ baseUrl: server.baseUrl }, "ada", PASSWORD);
  const api = createApi({ baseUrl: server.baseUrl, session });
  const count = 300;
  const { id } = await readyBatch(api, count, 50);
  const requested = unwrap(
    await api.POST("/v1/batches/{id}/pipelines", { params: { path: { id } }, body: { pipeline: "spellcheck" } }),
  );
  await waitFor("spellcheck to start", async () => {
    const status = unwrap(await api.GET("/v1/batches/{id}/status", { params: { path: { id } } }));
    return status.pipeline?.current_phase === "spellcheck";
  });
  const { live, sockets, received } = observed(server, session);
  const { subscription, versions } = follow(live, `batch:${id}`, requested.position);
  await waitFor("the snapshot", () => subscription.current());
  sockets[0]!.pause(); // stop reading: the server's writes back up, then its buffer overflows

  for (let i = 1; i <= count; i++) {
    const response = await fetch(`${server.baseUrl}/v1/internal/results`, {
      method: "POST",
      headers: { "x-api-key": key, "content-type": "application/json" },
      body: JSON.stringify({
        message_id: `${id}/spellcheck/e${i}`,
        batch_id: id,
        essay_id: `e${i}`,
        phase: "spellcheck",
        outcome: "succeeded",
        result: { notes: "n".repeat(60_000) },
      }),
    });
    assert.equal(response.status, 202, await response.text());
  }
  await waitFor("the server to drop changes for the slow reader", async () => {
    const metrics = await (await fetch(`${server.opsUrl}/metrics`)).text();
    const dropped = Number(metrics.match(/^essayflow_ws_dropped_total(?:\{[^}]*\})? (\d+)/m)?.[1] ?? 0);
    return dropped >= 1;
  });
  sockets[0]!.resume();

  await waitFor("the batch to complete", () => subscription.current()?.document.status === "completed", 60_000);
  assert.ok(received.some((m) => m.type === "lagged"), "the server said `lagged`");
  assert.equal(sockets.length, 1, "caught up on the same connection");
  assertContiguous(versions);
  const fetched = unwrap(await api.GET("/v1/batches/{id}", { params: { path: { id } } }));
  assert.equal(subscription.current()!.version, fetched.version);
  assert.deepEqual(subscription.current()!.document, fetched);
});

test("the access token is refreshed before it expires, and the open connection follows it", async () => {
  const server = await serve({ env: { ESSAYFLOW_TOKEN_TTL_SECS: "6" } });
  const session = await Session.login({ baseUrl: server.baseUrl }, "ada", PASSWORD);
  const firstExpiry = session.expiresAt;
  const api = createApi({ baseUrl: server.baseUrl, session });
  const { id, position } = await readyBatch(api, 3, 20);
  const { live, sockets, received } = observed(server, session);
  const { subscription } = follow(live, `batch:${id}`, position);
  await waitFor("the snapshot", () => subscription.current());

  // Two refreshes (at about 4 s and 8 s), each sent on the open connection and accepted.
  await waitFor("two refreshed connections", () => received.filter((m) => m.type === "refreshed").length >= 2, 20_000);
  assert.ok(Date.now() > firstExpiry, "past the first token's expiry");
  assert.ok(session.expiresAt > firstExpiry);
  assert.equal(sockets.length, 1, "the connection stayed open");
  assert.ok(!received.some((m) => m.type === "error"), JSON.stringify(received.filter((m) => m.type === "error")));

  // It still delivers: a command made now (with the refreshed token) arrives as a change.
  const cancelled = await api.POST("/v1/batches/{id}/cancel", { params: { path: { id } }, body: { reason: "a test" } });
  assert.equal(cancelled.response.status, 202);
  await waitFor("the cancel to arrive live", () => subscription.current()?.document.status === "cancelled");
  assert.equal(sockets.length, 1);
});

test("topics subscribed together share one connection, and a late listener gets the document", async () => {
  const server = await serve({});
  const session = await Session.login({ baseUrl: server.baseUrl }, "ada", PASSWORD);
  const api = createApi({ baseUrl: server.baseUrl, session });
  const { id, position } = await readyBatch(api, 2, 20);
  const { live, sockets } = observed(server, session);
  // Both in the same tick, while the first connection still waits for its token.
  const dashboard = follow(live, "dashboard");
  const batch = follow(live, `batch:${id}`, position);
  await waitFor("both snapshots", () => dashboard.subscription.current() && batch.subscription.current());
  assert.equal(sockets.length, 1, "one connection for both topics");

  // A second listener of a followed topic hears the current document after subscribe returns.
  let late: { version: number; current: number | undefined } | undefined;
  const second = live.subscribe(`batch:${id}`, {
    update: (_, version) => (late = { version, current: second.current()?.version }),
  });
  await waitFor("the late listener", () => late);
  assert.deepEqual(late, { version: batch.subscription.current()!.version, current: batch.subscription.current()!.version });

  // A refused topic tells every listener, the late ones too.
  const missing = `batch:${"0".repeat(8)}-0000-4000-8000-${"0".repeat(12)}` as const;
  const codes: string[] = [];
  live.subscribe(missing, { update: () => codes.push("update"), refused: (e) => codes.push(e.code) });
  await waitFor("the refusal", () => codes.length === 1);
  live.subscribe(missing, { update: () => codes.push("update"), refused: (e) => codes.push(e.code) });
  await waitFor("the late refusal", () => codes.length === 2);
  assert.deepEqual(codes, ["not_found", "not_found"]);

  live.close();
  await waitFor("the socket to close", () => sockets.every((s) => s.readyState === WebSocket.CLOSED));
});
