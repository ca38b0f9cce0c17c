// Debian's Chromium for the browser tests and the page benchmark: launched by playwright-core
// (which downloads nothing) from /usr/bin/chromium (or $CHROMIUM), trusting the test CA through
// the NSS database of a $HOME of its own, as a machine whose administrator installed the CA would.
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium, type Browser } from "playwright-core";

export const EXECUTABLE = process.env.CHROMIUM ?? "/usr/bin/chromium";

/** Launches headless Chromium trusting the CA certificate at `caPath` (PEM), if any. */
export async function launch(caPath?: string): Promise<{ browser: Browser; close: () => Promise<void> }> {
  const home = mkdtempSync(join(tmpdir(), "essayflow-browser-home-"));
  if (caPath) {
    const dir = join(home, ".pki", "nssdb");
    mkdirSync(dir, { recursive: true });
    execFileSync("certutil", ["-d", `sql:${dir}`, "-N", "--empty-password"]);
    execFileSync("certutil", ["-d", `sql:${dir}`, "-A", "-t", "C,,", "-n", "essayflow test CA", "-i", caPath]);
  }
  const browser = await chromium.launch({
    executablePath: EXECUTABLE,
    env: { ...process.env, HOME: home },
    // Without the background-networking flags, Chromium keeps trying to reach Google's hosts.
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  return {
    browser,
    close: async () => {
      await browser.close();
      rmSync(home, { recursive: true, force: true });
    },
  };
}
