// The page in a real browser: Debian's Chromium (/usr/bin/chromium, or $CHROMIUM), driven by
// playwright-core (which downloads nothing), against `essayflow serve --simulate-processors` over
// HTTPS and WSS with a test CA that the browser trusts through its NSS database.
//
// A teacher signs in, registers a batch and adds a class of 1 000 essays through the page, requests
// a pipeline and watches the page reach `completed` without a reload; another teacher sees none of
// it; an admin verifies a projection. Each view is checked with axe-core (no serious or critical
// accessibility violation) and saved as a screenshot in $ARTIFACTS_DIR (default
// web/test-results/).
import assert from "node:assert/strict";
import { mkdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join, resolve } from "node:path";
import { after, before, test } from "node:test";
import type { Browser, BrowserContext, Page } from "playwright-core";
import { launch } from "./chromium.ts";
import { essays, startServer, type TestServer } from "../../clients/typescript/test/harness.ts";

const ARTIFACTS = resolve(process.env.ARTIFACTS_DIR ?? new URL("../test-results", import.meta.url).pathname);
const AXE = readFileSync(createRequire(import.meta.url).resolve("axe-core/axe.min.js"), "utf8");
const USERS = {
  ada: ["ada", "teacher", "correct horse battery staple"],
  grace: ["grace", "teacher", "another long passphrase"],
  root: ["root", "admin", "the admin's own long passphrase"],
} as const;
const ESSAYS = 1000;

let server: TestServer;
let browser: Browser;
let closeBrowser: (() => Promise<void>) | undefined;
const problems: string[] = [];

before(async () => {
  mkdirSync(ARTIFACTS, { recursive: true });
  // Slow enough processors that the pipeline is seen running: 1 000 essays, 64 at a time.
  server = await startServer({ tls: true, simulate: true, env: { ESSAYFLOW_SIMULATOR_LATENCY_MS: "150" } });
  for (const [name, role, password] of Object.values(USERS)) server.addUser(name, role, password);
  ({ browser, close: closeBrowser } = await launch(server.caPath));
});

after(async () => {
  await closeBrowser?.();
  await server?.stop();
});

/** A fresh browser context (its own storage: another person's browser) on the page. */
async function open(name: string): Promise<{ context: BrowserContext; page: Page; headers: Record<string, string> }> {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.on("console", (m) => m.type() === "error" && problems.push(`${name} console: ${m.text()}`));
  page.on("pageerror", (e) => problems.push(`${name} page error: ${e.message}`));
  const response = await page.goto(server.baseUrl + "/");
  assert.equal(response?.status(), 200);
  return { context, page, headers: await response!.allHeaders() };
}

async function signIn(page: Page, user: keyof typeof USERS) {
  const [name, , password] = USERS[user];
  await page.getByLabel("Username").fill(name);
  await page.getByLabel("Password").fill(password);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("heading", { level: 1, name: "Dashboard" }).waitFor();
  await page.locator("[data-live=open]").waitFor();
}

async function shot(page: Page, name: string) {
  await page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });
}

/** axe-core's audit of the page as it is now: no serious or critical violation. */
async function accessible(page: Page, view: string) {
  // Evaluated through the DevTools protocol, which the page's CSP does not govern.
  const violations = (await page.evaluate(`(async () => { ${AXE}; const r = await axe.run(document, {
      runOnly: { type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"] } });
      return r.violations.filter((v) => v.impact === "serious" || v.impact === "critical")
        .map((v) => v.id + ": " + v.help + " (" + v.nodes.map((n) => n.target.join(" ")).slice(0, 3).join(", ") + ")"); })()`)) as string[];
  assert.deepEqual(violations, [], `${view}: accessibility violations`);
}

test("a teacher follows a class of 1 000 essays through a pipeline to completed, live, over WSS", async () => {
  const { context, page, headers } = await open("ada");
  try {
    await teacherFlow(context, page, headers);
  } catch (error) {
    await shot(page, "failure").catch(() => {});
    throw error;
  }
});

async function teacherFlow(context: BrowserContext, page: Page, headers: Record<string, string>) {
  const sockets: string[] = [];
  page.on("websocket", (ws) => sockets.push(ws.url()));

  // The page came over HTTPS, verified against the test CA, with its security headers.
  assert.match(headers["content-security-policy"] ?? "", /script-src 'self'/);
  assert.match(headers["strict-transport-security"] ?? "", /max-age=/);
  await page.getByRole("heading", { name: "essayflow" }).waitFor();
  await accessible(page, "sign-in");
  await shot(page, "01-sign-in");
  await page.getByLabel("Username").fill("ada");
  await page.getByLabel("Password").fill("not the password");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("alert").filter({ hasText: "Wrong username or password" }).waitFor();
  problems.length = 0; // the browser logs that refused sign-in's 401 as a console error

  await signIn(page, "ada");
  assert.ok(sockets.some((url) => url.startsWith("wss://localhost:")), `a WSS connection: ${sockets}`);
  // The open page holds the refresh token; the tab's storage gets it only when the page goes
  // away, so a reload stays signed in and a duplicated tab does not share the token family.
  const stored = () => page.evaluate(() => sessionStorage.getItem("essayflow.refresh_token"));
  assert.equal(await stored(), null);
  await page.reload();
  await page.getByRole("heading", { level: 1, name: "Dashboard" }).waitFor();
  await page.locator("[data-live=open]").waitFor();
  assert.equal(await stored(), null);
  await page.getByText("No batches yet", { exact: false }).first().waitFor();
  await accessible(page, "empty dashboard");
  await shot(page, "02-dashboard-empty");

  // Register a batch through the page.
  await page.getByRole("link", { name: "New batch" }).click();
  await page.getByLabel("Title").fill("Persuasive essays");
  await page.getByLabel("Course code").fill("EN-101");
  await page.getByLabel("Class (optional)").fill("9B");
  await page.getByLabel("Number of essays").fill(String(ESSAYS));
  await accessible(page, "new batch");
  await page.getByRole("button", { name: "Register batch" }).click();
  await page.getByRole("heading", { level: 1, name: "Persuasive essays" }).waitFor();
  const id = page.url().match(/#\/batches\/([0-9a-f-]{36})/)![1]!;
  await page.locator("[data-status=registered]").waitFor();

  // Add the class: 1 000 text files of 2 000 words (about 12 MB), sent in requests under 4 MiB.
  await page.getByLabel("Text files (one essay each)").setInputFiles(
    essays(ESSAYS, 2000).map((e) => ({ name: `${e.essay_id}.txt`, mimeType: "text/plain", buffer: Buffer.from(e.text) })),
  );
  await page.getByRole("button", { name: "Add files" }).click();
  await page.getByText(`${ESSAYS} of ${ESSAYS} essays added.`).waitFor({ timeout: 60_000 });
  await page.locator("[data-status=ready]").waitFor();
  await page.getByText(`Essays 1–50 of ${ESSAYS}`).waitFor();
  await shot(page, "03-batch-ready");

  // Request a pipeline; the page follows it without a reload.
  await page.evaluate(() => ((window as unknown as { marker: number }).marker = 42));
  await page.getByRole("combobox", { name: "Pipeline to run" }).selectOption("nlp");
  await page.getByRole("button", { name: "Request pipeline" }).click();
  await page.locator("[data-status=processing]").waitFor();
  // Mid-pipeline: some spellcheck outcomes in, and not all.
  await page.waitForFunction(() => {
    const bar = document.querySelector('[data-step="spellcheck"] progress') as HTMLProgressElement | null;
    return bar !== null && bar.value >= 100 && bar.value < bar.max;
  });
  await accessible(page, "batch mid-pipeline");
  await shot(page, "04-batch-mid-pipeline");
  await page.locator("[data-status=completed]").waitFor({ timeout: 120_000 });
  await page.locator('[data-step="nlp"][data-state="done"]').waitFor();
  assert.equal(await page.locator("td.outcome-succeeded").count(), 100, "50 essays shown, 2 phases each");
  await shot(page, "05-batch-completed");

  // The dashboard, live: the batch finished, totals say so.
  await page.getByRole("link", { name: "Dashboard" }).click();
  await page.locator("[data-total=completed] dd").filter({ hasText: "1" }).waitFor();
  const finished = page.locator(`section:has(h2:text("Recently finished")) tr[data-batch="${id}"]`);
  await finished.getByText("completed").waitFor();
  await accessible(page, "dashboard");
  await shot(page, "06-dashboard-completed");
  // A phone's width: the page does not scroll sideways (wide tables scroll in their own box).
  await page.setViewportSize({ width: 375, height: 800 });
  assert.ok(await page.evaluate(() => document.documentElement.scrollWidth <= 375), "no sideways scroll at 375 px");
  await shot(page, "06b-dashboard-narrow");
  await page.setViewportSize({ width: 1280, height: 900 });
  assert.equal(
    await page.evaluate(() => (window as unknown as { marker?: number }).marker),
    42,
    "the same document all along: no reload",
  );

  // The history: the slider shows the batch as it was.
  await page.evaluate((id) => (location.hash = `#/batches/${id}/history`), id);
  const slider = page.getByRole("slider", { name: "Version" });
  await slider.waitFor();
  await slider.focus();
  await page.keyboard.press("Home");
  await page.locator("output[data-version='1']").waitFor();
  await page.locator("[data-status=registered]").waitFor();
  await page.getByText("Event 1:").waitFor();
  await accessible(page, "history");
  await shot(page, "07-history-version-1");
  await page.keyboard.press("End");
  await page.locator("[aria-label^='The batch at version'] [data-status=completed]").waitFor();

  // Another teacher, in a browser of their own, sees none of it.
  const other = await open("grace");
  await signIn(other.page, "grace");
  await other.page.getByText("No batches yet", { exact: false }).first().waitFor();
  assert.equal(await other.page.locator(`[data-batch="${id}"]`).count(), 0);
  await other.page.goto(`${server.baseUrl}/#/batches/${id}`);
  await other.page.getByRole("heading", { level: 1, name: "Batch not found" }).waitFor();
  await shot(other.page, "08-other-teacher-not-found");
  await other.context.close();

  // An admin verifies the batch-state projection against the log.
  const admin = await open("root");
  await signIn(admin.page, "root");
  await admin.page.getByRole("link", { name: "Projections" }).click();
  const row = admin.page.locator("tr[data-projection=batch_state]");
  await row.waitFor();
  await row.getByRole("button", { name: "Verify batch_state" }).click();
  await row.getByText("matches the log").waitFor({ timeout: 60_000 });
  await accessible(admin.page, "projections");
  await shot(admin.page, "09-admin-projections");
  await admin.context.close();

  // Sign out ends the session: back to the sign-in form, and a reload does not resume it.
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.getByRole("button", { name: "Sign in" }).waitFor();
  await page.getByText("You are signed out.").waitFor();
  await page.reload();
  await page.getByRole("button", { name: "Sign in" }).waitFor();
  await context.close();

  assert.deepEqual(problems, [], "no console errors (CSP violations included)");
}
