// The session against a real server: what it keeps when the server is unreachable, refuses the
// token, or is logged out while a refresh is on its way.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { ProblemError, Session, type TokenStore } from "../src/index.js";
import { freePort, startServer, type TestServer } from "./harness.js";

const PASSWORD = "correct horse battery staple";
const KEY = "essayflow.refresh_token";

function memoryStore(initial?: string): TokenStore & { value: () => string | null } {
  const items = new Map<string, string>(initial ? [[KEY, initial]] : []);
  return {
    getItem: (k) => items.get(k) ?? null,
    setItem: (k, v) => void items.set(k, v),
    removeItem: (k) => void items.delete(k),
    value: () => items.get(KEY) ?? null,
  };
}

let server: TestServer;
before(async () => {
  server = await startServer({});
  server.addUser("ada", "teacher", PASSWORD);
});
after(async () => {
  await server?.stop();
});

test("resume keeps the stored token when the server cannot be reached, and forgets a refused one", async () => {
  const unreachable = memoryStore("efr_kept_for_later");
  await assert.rejects(
    Session.resume({ baseUrl: `http://127.0.0.1:${await freePort()}`, store: unreachable }),
    (e: unknown) => !(e instanceof ProblemError),
    "an unreachable server is an error, not a signed-out user",
  );
  assert.equal(unreachable.value(), "efr_kept_for_later");

  const refused = memoryStore("efr_not_a_token_of_this_server");
  assert.equal(await Session.resume({ baseUrl: server.baseUrl, store: refused }), null);
  assert.equal(refused.value(), null, "a refused token is forgotten");

  const store = memoryStore();
  const session = await Session.login({ baseUrl: server.baseUrl, store }, "ada", PASSWORD);
  const kept = store.value();
  assert.ok(kept?.startsWith("efr_"));
  session.close();
  const resumed = await Session.resume({ baseUrl: server.baseUrl, store });
  assert.ok(resumed, "the stored token resumes the session");
  assert.notEqual(store.value(), kept, "and is replaced by the next one (rotation)");
  resumed.close();
});

test("a refresh that finishes after logout keeps nothing of the revoked session", async () => {
  const store = memoryStore();
  // The refresh's answer is held back until the logout has finished.
  let release = () => {};
  const held = new Promise<void>((done) => (release = done));
  const slowRefresh: typeof fetch = async (input, init) => {
    const response = await fetch(input, init);
    if (String(input).endsWith("/v1/auth/refresh")) await held;
    return response;
  };
  const session = await Session.login({ baseUrl: server.baseUrl, store, fetch: slowRefresh }, "ada", PASSWORD);
  const heard: (string | null)[] = [];
  session.onChange((tokens) => heard.push(tokens && tokens.refresh_token));
  const refreshing = session.refresh();
  await session.logout();
  release();
  await refreshing.catch(() => {});
  assert.ok(session.ended);
  assert.equal(store.value(), null, "nothing stored after logout");
  assert.deepEqual(heard, [null], "listeners heard only that the session ended");
  await assert.rejects(session.token());
});

test("concurrent refreshes share one request, so the refresh token is spent once", async () => {
  const session = await Session.login({ baseUrl: server.baseUrl }, "ada", PASSWORD);
  const [a, b, c] = await Promise.all([session.refresh(), session.refresh(), session.refresh()]);
  assert.equal(a.refresh_token, b.refresh_token);
  assert.equal(b.refresh_token, c.refresh_token);
  // Had each sent its own, the second would have presented a spent token and the server would
  // have revoked the session: it still works.
  const answer = await fetch(`${server.baseUrl}/v1/dashboard`, {
    headers: { authorization: `Bearer ${await session.token()}` },
  });
  assert.equal(answer.status, 200);
  await session.logout();
});
