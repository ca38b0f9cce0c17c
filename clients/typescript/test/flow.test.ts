// The client against a real server (`essayflow serve --simulate-processors`, SQLite): a teacher's
// whole flow at a class's real size, followed live, and what another teacher does not see.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, before, test } from "node:test";
import { Ajv2020 } from "ajv/dist/2020.js";
import WebSocket from "ws";
import {
  createApi,
  LiveClient,
  liveUrl,
  ProblemError,
  Session,
  unwrap,
  type ServerMessage,
  type WebSocketLike,
} from "../src/index.js";
import { essays, startServer, waitFor, type TestServer } from "./harness.js";

const ADA = ["ada", "correct horse battery staple"] as const;
const GRACE = ["grace", "another long passphrase"] as const;
const schema = JSON.parse(
  readFileSync(new URL("../../../docs/schemas/ws-server.schema.json", import.meta.url), "utf8"),
);
const validServerMessage = new Ajv2020({ strict: false }).compile(schema);
// `ws` sockets fit the client's WebSocketLike as they are (no cast), as the README shows.
const connect = (url: string, protocols: string[]): WebSocketLike => new WebSocket(url, protocols);

let server: TestServer;
/** Closed after the tests, whatever happened (an open live client would reconnect forever). */
const closers: (() => void)[] = [];
before(async () => {
  server = await startServer({ simulate: true });
  server.addUser(ADA[0], "teacher", ADA[1]);
  server.addUser(GRACE[0], "teacher", GRACE[1]);
});
after(async () => {
  for (const close of closers) close();
  await server?.stop();
});

test("a teacher registers a class of 1 000 essays, runs ai_feedback and follows it live to completed", async () => {
  const session = await Session.login({ baseUrl: server.baseUrl }, ...ADA);
  assert.equal(session.claims.name, "ada");
  assert.equal(session.claims.role, "teacher");
  const api = createApi({ baseUrl: server.baseUrl, session });

  // Bad input: a problem naming each field and why.
  const bad = await api.POST("/v1/batches", {
    body: { title: " ", course_code: "EN 101", expected_essay_count: 0 },
  });
  assert.equal(bad.response.status, 422);
  assert.equal(bad.response.headers.get("content-type"), "application/problem+json");
  assert.deepEqual(bad.error?.errors?.map((e) => e.field).sort(), ["course_code", "expected_essay_count", "title"]);
  assert.throws(() => unwrap(bad), (e: unknown) => e instanceof ProblemError && e.status === 422);

  const registered = unwrap(
    await api.POST("/v1/batches", {
      body: { title: "Persuasive essays", course_code: "EN-101", expected_essay_count: 1000, class_designation: "9B" },
    }),
  );
  const id = registered.batch_id;

  const messages: ServerMessage[] = [];
  const live = new LiveClient({
    url: liveUrl(server.baseUrl),
    tokens: session,
    connect,
    onMessage: (message) => messages.push(message),
  });
  closers.push(() => live.close(), () => session.close());
  const versions: { version: number; cause: string }[] = [];
  const batch = live.subscribe(
    `batch:${id}`,
    { update: (_, version, cause) => versions.push({ version, cause }) },
    { minPosition: registered.position },
  );
  const dashboard = live.subscribe("dashboard", { update: () => {} });

  // 1 000 essays of 2 000 words (about 12 MB), in four requests under the 4 MiB body limit.
  const all = essays(1000, 2000);
  let position = 0;
  for (let i = 0; i < all.length; i += 250) {
    const added = unwrap(
      await api.POST("/v1/batches/{id}/essays", { params: { path: { id } }, body: { essays: all.slice(i, i + 250) } }),
    );
    position = added.position;
  }
  await waitFor("the live batch to be ready with 1 000 essays", () => {
    const doc = batch.current()?.document;
    return doc?.status === "ready" && doc.essay_count === 1000;
  });

  const catalog = unwrap(await api.GET("/v1/pipelines"));
  assert.deepEqual(
    catalog.items.find((p) => p.name === "ai_feedback")?.requires,
    ["spellcheck", "nlp"],
    "the catalog says what ai_feedback needs",
  );
  const requested = unwrap(
    await api.POST("/v1/batches/{id}/pipelines", { params: { path: { id } }, body: { pipeline: "ai_feedback" } }),
  );
  assert.ok(requested.position > position);

  await waitFor("the live batch to reach completed", () => batch.current()?.document.status === "completed", 180_000);
  const current = batch.current()!;
  const fetched = unwrap(await api.GET("/v1/batches/{id}", { params: { path: { id } } }));
  assert.equal(fetched.version, current.version, "nothing happens after completed");
  assert.deepEqual(current.document, fetched, "the patched document is what GET answers, field for field");
  assert.deepEqual(fetched.pipeline?.steps, ["spellcheck", "nlp", "ai_feedback"]);
  for (const phase of ["spellcheck", "nlp", "ai_feedback"]) {
    const outcomes = Object.values(fetched.phases[phase] ?? {});
    assert.equal(outcomes.length, 1000, `${phase}: an outcome per essay`);
    assert.ok(outcomes.every((o) => o.outcome === "succeeded"));
  }

  // Versions: a snapshot first; then every change exactly one after the previous version (a
  // snapshot may come at any time, never going back).
  assert.equal(versions[0]?.cause, "snapshot");
  for (let i = 1; i < versions.length; i++) {
    const [previous, next] = [versions[i - 1]!.version, versions[i]!];
    if (next.cause === "change") assert.equal(next.version, previous + 1, `no version skipped (at ${i})`);
    else assert.ok(next.version >= previous, `a snapshot never goes back (at ${i})`);
  }
  assert.equal(versions.at(-1)!.version, fetched.version);

  // The dashboard, followed live, ends where GET /v1/dashboard is.
  await waitFor("the live dashboard to show the batch finished", () =>
    dashboard.current()?.document.recently_finished.some((b) => b.batch_id === id && b.status === "completed"),
  );
  const board = unwrap(await api.GET("/v1/dashboard", { params: { query: { min_position: fetched.position } } }));
  await waitFor("the live dashboard to settle", () => {
    const doc = dashboard.current()?.document;
    return doc && JSON.stringify(doc.totals) === JSON.stringify(board.totals) && doc;
  });
  assert.deepEqual(dashboard.current()!.document, board);
  assert.equal(board.totals.completed, 1);

  // Every message the server sent is valid against the protocol's schema.
  assert.ok(messages.length > 3000);
  for (const message of messages) {
    assert.ok(validServerMessage(message), `${JSON.stringify(message).slice(0, 200)}: ${JSON.stringify(validServerMessage.errors)}`);
  }

  // The history, in pages, ends at the batch's version; the batch as of version 1 is registered.
  let events = 0;
  let after: string | undefined;
  do {
    const page = unwrap(
      await api.GET("/v1/batches/{id}/events", { params: { path: { id }, query: { limit: 1000, ...(after ? { after } : {}) } } }),
    );
    events += page.items.length;
    after = page.next_cursor ?? undefined;
  } while (after);
  assert.equal(events, fetched.version);
  const first = unwrap(await api.GET("/v1/batches/{id}", { params: { path: { id }, query: { at_version: 1 } } }));
  assert.equal(first.status, "registered");
  assert.equal(first.essays.length, 0);

  // Another teacher sees none of it: not over REST, not on the dashboard, not live.
  const grace = await Session.login({ baseUrl: server.baseUrl }, ...GRACE);
  const graceApi = createApi({ baseUrl: server.baseUrl, session: grace });
  const hidden = await graceApi.GET("/v1/batches/{id}", { params: { path: { id } } });
  assert.equal(hidden.response.status, 404);
  const graceBoard = unwrap(await graceApi.GET("/v1/dashboard"));
  assert.deepEqual(graceBoard.active_batches, []);
  assert.deepEqual(graceBoard.recently_finished, []);
  const graceLive = new LiveClient({ url: liveUrl(server.baseUrl), tokens: grace, connect });
  closers.push(() => graceLive.close(), () => grace.close());
  const refused = await new Promise<string>((done) => {
    graceLive.subscribe(`batch:${id}`, { update: () => done("update"), refused: (e) => done(e.code) });
  });
  assert.equal(refused, "not_found");
  graceLive.close();

  // Logging out ends the session: its tokens are refused, and the live client stops.
  live.close();
  await session.logout();
  assert.ok(session.ended);
  const afterLogout = await fetch(`${server.baseUrl}/v1/dashboard`, {
    headers: { authorization: `Bearer ${session.accessToken}` },
  });
  assert.equal(afterLogout.status, 401);
  grace.close();
});
