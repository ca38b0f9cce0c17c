// The page benchmark (`ONLY=page scripts/bench.sh`, or `cd web && node --import tsx bench/page.ts`):
// what a teacher's browser sees of essayflow, measured in Debian's Chromium (playwright-core,
// tests/chromium.ts) against `essayflow serve` over HTTPS and WSS with a test CA the browser
// trusts (the binary is $ESSAYFLOW_BIN, else the debug build; see the harness).
//
// 1. Change latency to the page. A teacher signs in through the page, registers a batch and
//    opens it (`#/batches/<id>`). Inside the page, before the rounds, a raw WebSocket of the
//    same origin subscribes to `batch:<id>` (the baseline: the change as the network delivers
//    it to this page) and a MutationObserver watches `dd[data-version]` (the page's own view,
//    which renders at most once per animation frame). Then, PAGE_CHANGES times (100), one
//    round at a time, the page `fetch`es one essay of ~300 words (POST /v1/batches/{id}/essays,
//    bearer token of the same teacher) and notes the 202's arrival and `version`; the round
//    ends when both the raw WebSocket's `change` of that version and the DOM showing it (or a
//    later version) were seen. Both are timed after the 202, on the page's one clock
//    (performance.now()); a change seen before its 202 counts as 0 ms and is counted. The
//    frame wait is shown beside the difference: the raw WebSocket's change -> the next animation
//    frame's callbacks (a requestAnimationFrame made on its arrival). The rest is the page's
//    render, but it cannot be taken apart exactly: the server sends the change to the page's
//    socket and to the raw one in either order. Also the POST's own time to its 202.
//    PAGE_WARMUP (5) rounds run first and are not counted; PAGE_ESSAY_WORDS (300) sets the
//    essays' size.
// 2. Page weight. In a fresh browser context (empty cache), `/` is loaded until the sign-in
//    form shows: per resource, the bytes received on the wire (CDP Network.loadingFinished
//    encodedDataLength: headers and body as sent, compressed) and the decoded body
//    (Network.getResponseBody), with the Content-Encoding. Then the same for signing in until
//    the live dashboard is shown (the API calls, and the WebSocket's frames as decoded
//    payload), and for a reload of the signed-in page (the return visit: cached assets).
//
// Progress goes to stderr; Markdown tables to stdout, then one line of JSON (the last line).
import type { Browser, BrowserContext, CDPSession, Page } from "playwright-core";
import { launch } from "../tests/chromium.ts";
import { essays, startServer, waitFor, type TestServer } from "../../clients/typescript/test/harness.ts";

const CHANGES = positive("PAGE_CHANGES", 100);
const WARMUP = positive("PAGE_WARMUP", 5, true);
const WORDS = positive("PAGE_ESSAY_WORDS", 300);
/** Deadline of one round, and of every other wait. */
const TIMEOUT_MS = 30_000;
const TEACHER = { name: "pagebench", password: "the page benchmark's passphrase" };

function positive(name: string, fallback: number, zero = false): number {
  const value = Number(process.env[name] ?? fallback);
  if (!Number.isInteger(value) || value < (zero ? 0 : 1)) throw new Error(`${name} must be a whole number`);
  return value;
}

const log = (line: string) => process.stderr.write(`page bench: ${line}\n`);

// ---- Page weight ----

interface Resource {
  url: string;
  status: number;
  protocol: string;
  encoding: string;
  /** Bytes received for it on the wire (headers and body as sent); 0 from the cache. */
  wire: number;
  /** The body, decoded. */
  body: number;
  cached: boolean;
}

interface Load {
  what: string;
  resources: Resource[];
  /** WebSocket frames received (decoded payload bytes) and their count. */
  wsFrames: number;
  wsBytes: number;
}

/** Records the network activity of `page` (over CDP) while `action` runs, until it is quiet. */
async function recordLoad(cdp: CDPSession, what: string, action: () => Promise<void>): Promise<Load> {
  interface Pending {
    url: string;
    status: number;
    wireStatus?: number;
    protocol: string;
    encoding: string;
    decoded: number;
    cached: boolean;
    wire?: number;
    failed?: string;
  }
  const requests = new Map<string, Pending>();
  let wsFrames = 0;
  let wsBytes = 0;
  type CdpResponse = { status: number; protocol?: string; headers: Record<string, string>; fromDiskCache?: boolean };
  const listeners: [string, (event: never) => void][] = [
    ["Network.requestWillBeSent", (e: { requestId: string; request: { url: string } }) => {
      requests.set(e.requestId,
        { url: e.request.url, status: 0, protocol: "", encoding: "", decoded: 0, cached: false });
    }],
    ["Network.requestServedFromCache", (e: { requestId: string }) => {
      const r = requests.get(e.requestId);
      if (r) r.cached = true;
    }],
    ["Network.responseReceived", (e: { requestId: string; response: CdpResponse }) => {
      const r = requests.get(e.requestId);
      if (!r) return;
      r.status = e.response.status;
      r.protocol = e.response.protocol ?? "";
      r.cached ||= e.response.fromDiskCache === true;
      const encoding = Object.entries(e.response.headers).find(([k]) => k.toLowerCase() === "content-encoding");
      r.encoding = encoding?.[1] ?? "";
    }],
    // The status as it came over the wire (a revalidation's 304 shows as the cached 200 above).
    ["Network.responseReceivedExtraInfo", (e: { requestId: string; statusCode: number }) => {
      const r = requests.get(e.requestId);
      if (r) r.wireStatus = e.statusCode;
    }],
    ["Network.dataReceived", (e: { requestId: string; dataLength: number }) => {
      const r = requests.get(e.requestId);
      if (r) r.decoded += e.dataLength;
    }],
    ["Network.loadingFinished", (e: { requestId: string; encodedDataLength: number }) => {
      const r = requests.get(e.requestId);
      if (r) r.wire = e.encodedDataLength;
    }],
    ["Network.loadingFailed", (e: { requestId: string; errorText: string }) => {
      const r = requests.get(e.requestId);
      if (r) r.failed = e.errorText;
    }],
    ["Network.webSocketFrameReceived", (e: { response: { payloadData: string } }) => {
      wsFrames += 1;
      wsBytes += Buffer.byteLength(e.response.payloadData);
    }],
  ];
  for (const [event, listener] of listeners) cdp.on(event as "Network.dataReceived", listener as never);
  try {
    await action();
    // Until every request seen has finished (or failed).
    await waitFor(`${what}: every request finished`, () =>
      [...requests.values()].every((r) => r.wire !== undefined || r.failed !== undefined), TIMEOUT_MS);
  } finally {
    for (const [event, listener] of listeners) cdp.off(event as "Network.dataReceived", listener as never);
  }
  const resources: Resource[] = [];
  for (const [requestId, r] of requests) {
    if (r.failed) throw new Error(`${what}: ${r.url} failed: ${r.failed}`);
    // The decoded body as the browser keeps it; the sum of the chunks if it keeps none.
    let body = r.decoded;
    try {
      const answer = await cdp.send("Network.getResponseBody", { requestId });
      body = answer.base64Encoded ? Buffer.from(answer.body, "base64").length : Buffer.byteLength(answer.body);
    } catch {
      // No body (a 304, a 204) or no longer kept.
    }
    resources.push({ url: new URL(r.url).pathname, status: r.wireStatus ?? r.status, protocol: r.protocol,
      encoding: r.encoding, wire: r.wire ?? 0, body, cached: r.cached });
  }
  return { what, resources, wsFrames, wsBytes };
}

async function signIn(page: Page) {
  await page.getByLabel("Username").fill(TEACHER.name);
  await page.getByLabel("Password").fill(TEACHER.password);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("heading", { level: 1, name: "Dashboard" }).waitFor({ timeout: TIMEOUT_MS });
  await page.locator("[data-live=open]").waitFor({ timeout: TIMEOUT_MS });
}

async function pageWeight(browser: Browser, server: TestServer): Promise<Load[]> {
  // A fresh context: an empty cache, no session.
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  try {
    const page = await context.newPage();
    const cdp = await context.newCDPSession(page);
    await cdp.send("Network.enable");
    const first = await recordLoad(cdp, "first load", async () => {
      await page.goto(`${server.baseUrl}/`);
      await page.getByRole("button", { name: "Sign in" }).waitFor({ timeout: TIMEOUT_MS });
    });
    const signedIn = await recordLoad(cdp, "sign-in", async () => {
      await signIn(page);
      // The dashboard's data, not only its frame.
      await page.getByText("No batches yet", { exact: false }).first().waitFor({ timeout: TIMEOUT_MS });
    });
    const again = await recordLoad(cdp, "reload", async () => {
      await page.reload();
      await page.getByRole("heading", { level: 1, name: "Dashboard" }).waitFor({ timeout: TIMEOUT_MS });
      await page.locator("[data-live=open]").waitFor({ timeout: TIMEOUT_MS });
      await page.getByText("No batches yet", { exact: false }).first().waitFor({ timeout: TIMEOUT_MS });
    });
    return [
      { ...first, what: "first load of / (empty cache), until the sign-in form" },
      { ...signedIn, what: "signing in, until the live dashboard" },
      { ...again, what: "reload of the signed-in dashboard (return visit)" },
    ];
  } finally {
    await context.close();
  }
}

// ---- Change latency ----

interface Round {
  version: number;
  /** Request sent -> 202 received. */
  httpMs: number;
  /** 202 received -> the raw WebSocket's change (may be negative). */
  wsMs: number;
  /** 202 received -> the DOM shows the version (may be negative). */
  domMs: number;
  /** The raw WebSocket's change -> the next animation frame's callbacks run. */
  frameMs: number;
}

/** What the page keeps between rounds (window.__pageBench). */
interface Recorder {
  ws: WebSocket;
  observer: MutationObserver;
  wsAt: Map<number, number>;
  domAt: Map<number, number>;
  frameAt: Map<number, number>;
  wsLast: number;
  domLast: number;
  wake: (() => void)[];
  seeDom: () => void;
  problems: string[];
}

/** Installs the raw WebSocket and the DOM observer in the page; answers the snapshot's version. */
function install({ id, token, timeoutMs }: { id: string; token: string; timeoutMs: number }): Promise<number> {
  const topic = `batch:${id}`;
  const domVersion = () => Number(document.querySelector("dd[data-version]")?.getAttribute("data-version") ?? 0);
  const r = {
    wsAt: new Map<number, number>(),
    domAt: new Map<number, number>(),
    frameAt: new Map<number, number>(),
    wsLast: 0,
    domLast: domVersion(),
    wake: [] as (() => void)[],
    problems: [] as string[],
  } as Recorder;
  const wake = () => {
    const waiting = r.wake;
    r.wake = [];
    for (const resolve of waiting) resolve();
  };
  // Every version the DOM passed over in one render is shown from that moment.
  r.seeDom = () => {
    const now = performance.now();
    const v = domVersion();
    if (v <= r.domLast) return;
    for (let k = r.domLast + 1; k <= v; k++) r.domAt.set(k, now);
    r.domLast = v;
    wake();
  };
  r.observer = new MutationObserver(r.seeDom);
  r.observer.observe(document.body,
    { subtree: true, childList: true, attributes: true, attributeFilter: ["data-version"] });
  (window as unknown as { __pageBench: Recorder }).__pageBench = r;
  return new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no snapshot of ${topic} within ${timeoutMs} ms`)), timeoutMs);
    r.ws = new WebSocket(`${location.origin.replace(/^http/, "ws")}/v1/ws`, ["essayflow.v1", `bearer.${token}`]);
    r.ws.onerror = () => reject(new Error("the raw WebSocket failed"));
    r.ws.onclose = (e) => r.problems.push(`raw WebSocket closed: ${e.code} ${e.reason}`);
    r.ws.onopen = () => r.ws.send(JSON.stringify({ type: "subscribe", topic }));
    r.ws.onmessage = (e) => {
      const now = performance.now();
      const m = JSON.parse(e.data as string) as { type: string; topic?: string; version?: number; message?: string };
      if (m.type === "snapshot" && m.topic === topic) {
        r.wsLast = Math.max(r.wsLast, m.version!);
        clearTimeout(timer);
        resolve(m.version!);
      } else if (m.type === "change" && m.topic === topic) {
        for (let k = r.wsLast + 1; k <= m.version!; k++) r.wsAt.set(k, now);
        r.wsLast = Math.max(r.wsLast, m.version!);
        // When the next animation frame's callbacks run: the page (rendering once per frame) can
        // first show the change then. (Not rAF's timestamp: that is the frame's begin time,
        // which may precede the message's arrival.)
        const version = m.version!;
        requestAnimationFrame(() => {
          r.frameAt.set(version, performance.now());
          wake();
        });
        wake();
      } else if (m.type === "error" || m.type === "lagged") {
        r.problems.push(`raw WebSocket: ${e.data as string}`);
      }
    };
  });
}

/** One round, in the page: POST one essay, then wait for its change on both sides. */
async function round(args: { id: string; token: string; essay: object; timeoutMs: number }): Promise<Round> {
  const r = (window as unknown as { __pageBench: Recorder }).__pageBench;
  const sent = performance.now();
  const response = await fetch(`/v1/batches/${args.id}/essays`, {
    method: "POST",
    headers: { authorization: `Bearer ${args.token}`, "content-type": "application/json" },
    body: JSON.stringify({ essays: [args.essay] }),
  });
  const t202 = performance.now();
  if (response.status !== 202) throw new Error(`POST essays answered ${response.status}: ${await response.text()}`);
  const { version } = (await response.json()) as { version: number };
  // The immediate check (the observer reports mutations, this catches a render already done).
  r.seeDom();
  const deadline = t202 + args.timeoutMs;
  while (!r.wsAt.has(version) || !r.domAt.has(version) || !r.frameAt.has(version)) {
    const left = deadline - performance.now();
    if (left <= 0) {
      throw new Error(`version ${version} not seen within ${args.timeoutMs} ms: WebSocket at ${r.wsLast}, DOM at ` +
        `${r.domLast}; ${r.problems.join("; ")}`);
    }
    // Woken by the next change or render, or at the deadline.
    await new Promise<void>((resolve) => {
      r.wake.push(resolve);
      setTimeout(resolve, left);
    });
  }
  const wsAt = r.wsAt.get(version)!;
  return { version, httpMs: t202 - sent, wsMs: wsAt - t202, domMs: r.domAt.get(version)! - t202,
    frameMs: r.frameAt.get(version)! - wsAt };
}

async function changeLatency(browser: Browser, server: TestServer): Promise<Round[]> {
  const context: BrowserContext = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  try {
    const page = await context.newPage();
    const errors: string[] = [];
    page.on("pageerror", (e) => errors.push(e.message));
    await page.goto(`${server.baseUrl}/`);
    await signIn(page);
    // Register the batch through the page; it opens the batch view (#/batches/<id>).
    await page.getByRole("link", { name: "New batch" }).click();
    await page.getByLabel("Title").fill("Page benchmark");
    await page.getByLabel("Course code").fill("BENCH-1");
    await page.getByLabel("Number of essays").fill(String(WARMUP + CHANGES + 10));
    await page.getByRole("button", { name: "Register batch" }).click();
    await page.getByRole("heading", { level: 1, name: "Page benchmark" }).waitFor({ timeout: TIMEOUT_MS });
    await page.waitForURL(/#\/batches\/[0-9a-f-]{36}$/, { timeout: TIMEOUT_MS });
    const id = page.url().match(/#\/batches\/([0-9a-f-]{36})$/)![1]!;
    await page.locator("dd[data-version]").waitFor({ timeout: TIMEOUT_MS });

    // A token of the same teacher for the rounds' POSTs and the raw WebSocket.
    const token = await page.evaluate(async ({ name, password }) => {
      const response = await fetch("/v1/auth/login", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ username: name, password }),
      });
      if (!response.ok) throw new Error(`login answered ${response.status}`);
      return ((await response.json()) as { access_token: string }).access_token;
    }, TEACHER);
    // tsx (esbuild's keepNames) wraps the named functions inside `install` and `round` in
    // `__name(fn, "name")`, which the page does not define: a no-op one (a string, untransformed).
    await page.evaluate("globalThis.__name ??= (fn) => fn");
    const snapshot = await page.evaluate(install, { id, token, timeoutMs: TIMEOUT_MS });
    log(`batch ${id} open at version ${snapshot}; ${WARMUP} warm-up rounds, then ${CHANGES}`);

    const texts = essays(WARMUP + CHANGES, WORDS, "p");
    const rounds: Round[] = [];
    for (let i = 0; i < WARMUP + CHANGES; i++) {
      const result = await page.evaluate(round, { id, token, essay: texts[i]!, timeoutMs: TIMEOUT_MS });
      if (i >= WARMUP) rounds.push(result);
      if ((i + 1) % 25 === 0) log(`${i + 1} rounds`);
    }
    const problems = await page.evaluate(() => {
      const r = (window as unknown as { __pageBench: Recorder }).__pageBench;
      r.observer.disconnect();
      r.ws.close();
      return r.problems.filter((p) => !p.startsWith("raw WebSocket closed"));
    });
    if (problems.length || errors.length) throw new Error(`the page reported: ${[...problems, ...errors].join("; ")}`);
    return rounds;
  } finally {
    await context.close();
  }
}

// ---- Figures ----

/** Nearest-rank percentile of sorted values. */
function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))]!;
}

/** p50/p99/max/mean; with `after202`, values at or below 0 (seen by the 202) count as 0 and are counted. */
function summary(values: number[], after202: boolean) {
  const round2 = (v: number) => Math.round(v * 100) / 100;
  const sorted = values.map((v) => (after202 ? Math.max(0, v) : v)).sort((a, b) => a - b);
  return {
    p50_ms: round2(percentile(sorted, 50)),
    p99_ms: round2(percentile(sorted, 99)),
    max_ms: round2(sorted[sorted.length - 1]!),
    mean_ms: round2(sorted.reduce((a, b) => a + b, 0) / sorted.length),
    ...(after202 ? { at_or_before_202: values.filter((v) => v <= 0).length } : {}),
  };
}

const kb = (bytes: number) => (bytes / 1024).toFixed(1);

function weightTable(load: Load): string[] {
  const lines = [
    `| ${load.what} | status | protocol | content-encoding | on the wire, KB | decoded body, KB |`,
    "|---|---|---|---|---|---|",
  ];
  for (const r of load.resources) {
    lines.push(`| ${r.url} | ${r.status}${r.cached ? " (cache)" : ""} | ${r.protocol} | ${r.encoding || "none"} | ` +
      `${kb(r.wire)} | ${kb(r.body)} |`);
  }
  if (load.wsFrames) {
    lines.push(`| /v1/ws: ${load.wsFrames} frame(s) received | | | | | ${kb(load.wsBytes)} (payload) |`);
  }
  const wire = load.resources.reduce((a, r) => a + r.wire, 0);
  const body = load.resources.reduce((a, r) => a + r.body, 0);
  lines.push(`| **total** (${load.resources.length} requests) | | | | **${kb(wire)}** | **${kb(body)}** |`, "");
  return lines;
}

async function main() {
  let server: TestServer | undefined;
  let close: (() => Promise<void>) | undefined;
  try {
    log("starting the server (TLS)");
    server = await startServer({
      tls: true,
      // The harness passes no ESSAYFLOW_* variable through: the tier as scripts/bench.sh sets it.
      env: { ESSAYFLOW_RATE_LIMIT_DEFAULT_TIER: process.env.ESSAYFLOW_RATE_LIMIT_DEFAULT_TIER ?? "enterprise" },
    });
    server.addUser(TEACHER.name, "teacher", TEACHER.password);
    let browser: Browser;
    ({ browser, close } = await launch(server.caPath));
    log(`Chromium ${browser.version()}; page weight`);
    const loads = await pageWeight(browser, server);
    log("change latency");
    const rounds = await changeLatency(browser, server);

    const ws = summary(rounds.map((r) => r.wsMs), true);
    const dom = summary(rounds.map((r) => r.domMs), true);
    // The page's own cost beyond the network (negative when the page's socket was the faster).
    const gap = summary(rounds.map((r) => r.domMs - r.wsMs), false);
    // The wait for the next animation frame (the page renders in one), beside that difference.
    const frame = summary(rounds.map((r) => r.frameMs), false);
    const http = summary(rounds.map((r) => r.httpMs), false);
    const out = [
      `| after the 202 (${rounds.length} rounds, one essay of ~${WORDS} words each) | p50 ms | p99 ms | max ms | mean ms | seen at or before the 202 (counted as 0) |`,
      "|---|---|---|---|---|---|",
      `| raw WebSocket in the page: the change (baseline) | ${ws.p50_ms} | ${ws.p99_ms} | ${ws.max_ms} | ${ws.mean_ms} | ${ws.at_or_before_202} |`,
      `| the page's DOM shows the version | ${dom.p50_ms} | ${dom.p99_ms} | ${dom.max_ms} | ${dom.mean_ms} | ${dom.at_or_before_202} |`,
      `| DOM minus raw WebSocket, per round | ${gap.p50_ms} | ${gap.p99_ms} | ${gap.max_ms} | ${gap.mean_ms} | |`,
      `| (beside it: raw WebSocket's change -> the next animation frame's callbacks) | ${frame.p50_ms} | ${frame.p99_ms} | ${frame.max_ms} | ${frame.mean_ms} | |`,
      `| (the POST itself: sent -> 202) | ${http.p50_ms} | ${http.p99_ms} | ${http.max_ms} | ${http.mean_ms} | |`,
      "",
      ...loads.flatMap(weightTable),
    ];
    process.stdout.write(out.join("\n") + "\n");
    const totals = (load: Load) => ({
      requests: load.resources.length,
      wire_bytes: load.resources.reduce((a, r) => a + r.wire, 0),
      body_bytes: load.resources.reduce((a, r) => a + r.body, 0),
      ws_frames: load.wsFrames,
      ws_bytes: load.wsBytes,
      resources: load.resources,
    });
    process.stdout.write(JSON.stringify({
      rounds: rounds.length,
      essay_words: WORDS,
      chromium: browser.version(),
      websocket: ws,
      page: dom,
      page_minus_websocket: gap,
      websocket_to_frame: frame,
      http,
      first_load: totals(loads[0]!),
      sign_in: totals(loads[1]!),
      reload: totals(loads[2]!),
    }) + "\n");
  } finally {
    await close?.().catch((e) => log(`closing the browser: ${e}`));
    await server?.stop().catch((e) => log(`stopping the server: ${e}`));
  }
}

main().catch((error) => {
  log(error instanceof Error ? (error.stack ?? error.message) : String(error));
  process.exitCode = 1;
});
