// Starts the real essayflow binary for the client and browser tests: `essayflow serve` on a
// free port, with a SQLite database, a JWT secret and users of its own in a temporary
// directory, optionally with TLS (a test CA made with openssl) and the development processors.
//
// The binary is $ESSAYFLOW_BIN, else $CARGO_TARGET_DIR/debug/essayflow, else target/debug/essayflow
// at the repository's root (`cargo build --bin essayflow`).
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { request as httpsRequest } from "node:https";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { essayflowBinary } from "../scripts/binary.mjs";

export interface ServerOptions {
  /** Serve HTTPS and WSS with a certificate of a fresh test CA. */
  tls?: boolean;
  /** Run the development processors in the server (`--simulate-processors`). */
  simulate?: boolean;
  /** More `ESSAYFLOW_*` settings. */
  env?: Record<string, string>;
}

export interface TestServer {
  /** `http://127.0.0.1:PORT` (or `https://localhost:PORT` with TLS). */
  baseUrl: string;
  /** The operations listener (`/metrics`, `/readyz`), plain HTTP. */
  opsUrl: string;
  /** The test CA's certificate (PEM file), with TLS. */
  caPath?: string;
  /** Where the database, the certificates and the log are. */
  dir: string;
  /** Adds a user with the CLI. */
  addUser(username: string, role: "admin" | "teacher" | "service", password: string): void;
  /** Creates an API key for a service user with the CLI; returns the key. */
  apiKey(username: string): string;
  /** The server's log so far. */
  log(): string;
  stop(): Promise<void>;
}

/** A port nobody listens on now. */
export async function freePort(): Promise<number> {
  return new Promise((done, fail) => {
    const server = createServer();
    server.once("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address ? address.port : 0;
      server.close(() => done(port));
    });
  });
}

/** Waits until `check` holds, polling every 50 ms, or throws after `timeoutMs`. */
export async function waitFor<T>(
  what: string,
  check: () => T | undefined | false | null | Promise<T | undefined | false | null>,
  timeoutMs = 30_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Makes a CA and a certificate for localhost and 127.0.0.1 signed by it (openssl). */
function testCa(dir: string): { ca: string; cert: string; key: string } {
  const ca = join(dir, "ca.pem");
  const caKey = join(dir, "ca.key");
  const cert = join(dir, "server.pem");
  const key = join(dir, "server.key");
  const csr = join(dir, "server.csr");
  const ext = join(dir, "server.ext");
  const run = (...args: string[]) => execFileSync("openssl", args, { stdio: "pipe" });
  run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", caKey,
    "-out", ca, "-days", "2", "-subj", "/CN=essayflow test CA",
    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign");
  run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", csr,
    "-subj", "/CN=localhost");
  writeFileSync(ext, "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n");
  run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", caKey, "-CAcreateserial", "-out", cert, "-days", "2",
    "-extfile", ext);
  return { ca, cert, key };
}

export async function startServer(options: ServerOptions = {}): Promise<TestServer> {
  const dir = mkdtempSync(join(tmpdir(), "essayflow-client-test-"));
  const port = await freePort();
  const opsPort = await freePort();
  const env: Record<string, string> = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (value !== undefined && !key.startsWith("ESSAYFLOW_")) env[key] = value;
  }
  Object.assign(env, {
    ESSAYFLOW_DATABASE_URL: `sqlite:${join(dir, "essayflow.db")}`,
    ESSAYFLOW_JWT_SECRET: "a-test-secret-of-at-least-32-characters",
    ESSAYFLOW_BIND: `127.0.0.1:${port}`,
    ESSAYFLOW_OPS_BIND: `127.0.0.1:${opsPort}`,
    ESSAYFLOW_LOG: process.env.ESSAYFLOW_LOG ?? "warn",
    ESSAYFLOW_SIMULATOR_LATENCY_MS: "20",
    ...options.env,
  });
  let caPath: string | undefined;
  if (options.tls) {
    const made = testCa(dir);
    caPath = made.ca;
    env.ESSAYFLOW_TLS_CERT = made.cert;
    env.ESSAYFLOW_TLS_KEY = made.key;
  }
  const bin = essayflowBinary();
  execFileSync(bin, ["migrate"], { env, stdio: "pipe" });
  const logPath = join(dir, "server.log");
  writeFileSync(logPath, "");
  const args = ["serve", ...(options.simulate ? ["--simulate-processors"] : [])];
  const child: ChildProcess = spawn(bin, args, { env, stdio: ["ignore", "pipe", "pipe"] });
  let log = "";
  const keep = (chunk: Buffer) => {
    log += chunk.toString();
    if (log.length > 1_000_000) log = log.slice(-500_000);
  };
  child.stdout!.on("data", keep);
  child.stderr!.on("data", keep);
  let exited: number | null | undefined;
  child.on("exit", (code) => (exited = code));
  const baseUrl = options.tls ? `https://localhost:${port}` : `http://127.0.0.1:${port}`;
  await waitFor(
    "the server to answer /healthz",
    async () => {
      if (exited !== undefined) throw new Error(`essayflow serve exited with ${exited}:\n${log}`);
      return healthy(baseUrl, caPath);
    },
    60_000,
  );
  return {
    baseUrl,
    opsUrl: `http://127.0.0.1:${opsPort}`,
    caPath,
    dir,
    addUser(username, role, password) {
      execFileSync(bin, ["users", "add", "--username", username, "--role", role, "--password-stdin"], {
        env,
        input: `${password}\n`,
        stdio: ["pipe", "pipe", "pipe"],
      });
    },
    apiKey(username) {
      const out = execFileSync(bin, ["keys", "create", "--username", username, "--name", `${username} test key`], {
        env,
        encoding: "utf8",
        stdio: ["ignore", "pipe", "pipe"],
      });
      const key = out.match(/efk_[A-Za-z0-9_-]+/)?.[0];
      if (!key) throw new Error(`no key in: ${out}`);
      return key;
    },
    log: () => log,
    async stop() {
      if (exited === undefined) {
        const gone = new Promise((done) => child.once("exit", done));
        child.kill("SIGTERM");
        await gone;
      }
      if (!process.env.KEEP_TEST_DIRS) rmSync(dir, { recursive: true, force: true });
    },
  };
}

async function healthy(baseUrl: string, caPath?: string): Promise<boolean> {
  if (!caPath) {
    try {
      return (await fetch(`${baseUrl}/healthz`)).ok;
    } catch {
      return false;
    }
  }
  const ca = readFileSync(caPath);
  return new Promise((done) => {
    const req = httpsRequest(`${baseUrl}/healthz`, { ca }, (res) => {
      res.resume();
      done(res.statusCode === 200);
    });
    req.on("error", () => done(false));
    req.end();
  });
}

/** `count` essays of about `words` words each, as a class would hand them in. */
export function essays(count: number, words: number, prefix = "e"): { essay_id: string; title: string; text: string }[] {
  const vocabulary = ("the argument of this essay is that homework should be limited because students need time " +
    "to rest read play and think for themselves while teachers can still check understanding in class").split(" ");
  return Array.from({ length: count }, (_, i) => {
    const text: string[] = [];
    for (let w = 0; w < words; w++) text.push(vocabulary[(w * 7 + i) % vocabulary.length]!);
    return { essay_id: `${prefix}${i + 1}`, title: `Essay ${i + 1}`, text: text.join(" ") + "." };
  });
}
