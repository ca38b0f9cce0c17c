// A login session: the access token (a JWT) and the refresh token of POST /v1/auth/login, kept
// fresh by POST /v1/auth/refresh before the access token expires (RFC 9700 rotation: each
// refresh token is spent once and replaced).
import type { components } from "./schema.js";

/** The answer of `POST /v1/auth/login` and `POST /v1/auth/refresh`. */
export type TokenPair = components["schemas"]["TokenPair"];

/** An RFC 9457 problem, as every refusal of the API is (`application/problem+json`). */
export type Problem = components["schemas"]["Problem"];

/**
 * The claims of an access token (RFC 7519), decoded without checking the signature: for display
 * (the user's name and role) and timing only. The server checks every token itself.
 */
export interface AccessClaims {
  /** The user's id (UUID). */
  sub: string;
  /** The username. */
  name: string;
  role: "admin" | "teacher" | "service";
  /** Expiry, seconds since the Unix epoch. */
  exp: number;
  /** The login session (refresh-token family). */
  sid: string;
}

/** A refusal of the API: the HTTP status and the problem document it came with. */
export class ProblemError extends Error {
  constructor(
    readonly status: number,
    readonly problem: Problem,
  ) {
    super(`${status} ${problem.type}: ${problem.detail}`);
    this.name = "ProblemError";
  }
}

/** Where a session keeps its refresh token across page loads (`sessionStorage` in a browser). */
export interface TokenStore {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

export interface SessionOptions {
  /** The server's origin, e.g. `https://essayflow.example` (paths are appended). */
  baseUrl: string;
  /** The fetch to use (default: the global one). */
  fetch?: typeof fetch;
  /**
   * Refresh this many seconds before the access token expires (default 60, and never later than
   * two thirds into its lifetime, so a short-lived token is refreshed in time too).
   */
  refreshMarginSeconds?: number;
  /** Keeps the refresh token so that a page reload resumes the session (default: none). */
  store?: TokenStore | null;
  /** The key under which `store` keeps the refresh token (default `essayflow.refresh_token`). */
  storeKey?: string;
}

type Listener = (tokens: TokenPair | null) => void;

/**
 * A session of one user. It refreshes the access token on a timer before it expires, and on
 * demand ({@link Session.refresh}, after a 401); concurrent refreshes share one request, because
 * a refresh token can be spent only once (presenting it twice revokes the whole session).
 * Listeners hear every new pair, and `null` when the session ended (logged out, revoked, or its
 * refresh token refused): the user must log in again.
 */
export class Session {
  #tokens: TokenPair;
  #expiresAt: number;
  #claims: AccessClaims;
  #inflight: Promise<TokenPair> | null = null;
  #timer: ReturnType<typeof setTimeout> | null = null;
  #listeners = new Set<Listener>();
  #ended = false;
  readonly #options: Required<Pick<SessionOptions, "baseUrl" | "refreshMarginSeconds" | "storeKey">> &
    SessionOptions;

  private constructor(options: SessionOptions, tokens: TokenPair) {
    this.#options = {
      refreshMarginSeconds: 60,
      storeKey: "essayflow.refresh_token",
      ...options,
      baseUrl: options.baseUrl.replace(/\/+$/, ""),
    };
    this.#tokens = tokens;
    this.#expiresAt = Date.now() + tokens.expires_in * 1000;
    this.#claims = decodeClaims(tokens.access_token);
    this.#keep();
    this.#schedule();
  }

  /**
   * Logs in with a username and password.
   * @throws {ProblemError} 401 (wrong credentials), 429 `login-throttled` (wait `Retry-After`),
   *   503 `busy`.
   */
  static async login(options: SessionOptions, username: string, password: string): Promise<Session> {
    const tokens = await post(options, "/v1/auth/login", { username, password });
    return new Session(options, tokens);
  }

  /**
   * Resumes the session whose refresh token `options.store` kept (after a page reload), by
   * refreshing it; `null` if there is none or the server refused it (401: the token is
   * forgotten).
   * @throws the fetch's error when the server cannot be reached, or a {@link ProblemError} of
   *   another status (429, 503): the token is kept for a later try.
   */
  static async resume(options: SessionOptions): Promise<Session | null> {
    const key = options.storeKey ?? "essayflow.refresh_token";
    const refreshToken = options.store?.getItem(key);
    if (!refreshToken) return null;
    try {
      return new Session(options, await post(options, "/v1/auth/refresh", { refresh_token: refreshToken }));
    } catch (error) {
      if (error instanceof ProblemError && error.status === 401) {
        options.store?.removeItem(key);
        return null;
      }
      throw error;
    }
  }

  /** The current access token (it may be about to expire: prefer {@link Session.token}). */
  get accessToken(): string {
    return this.#tokens.access_token;
  }

  /** The current access token's claims (unverified; for display). */
  get claims(): AccessClaims {
    return this.#claims;
  }

  /** When the current access token expires, in milliseconds since the Unix epoch (local clock). */
  get expiresAt(): number {
    return this.#expiresAt;
  }

  /** Whether the session ended (logged out, revoked or refused): log in again. */
  get ended(): boolean {
    return this.#ended;
  }

  /** A valid access token: the current one, or a fresh one if it expires within the margin. */
  async token(): Promise<string> {
    if (this.#ended) throw new Error("the session ended: log in again");
    if (Date.now() >= this.#expiresAt - this.#margin() * 1000) await this.refresh();
    return this.#tokens.access_token;
  }

  /**
   * Exchanges the refresh token for the next pair now. Concurrent calls share one request.
   * @throws {ProblemError} 401: the session ended (listeners hear `null`).
   */
  refresh(): Promise<TokenPair> {
    if (this.#ended) return Promise.reject(new Error("the session ended: log in again"));
    this.#inflight ??= (async () => {
      try {
        const tokens = await post(this.#options, "/v1/auth/refresh", {
          refresh_token: this.#tokens.refresh_token,
        });
        // Logged out meanwhile: the server revoked the family; keep nothing of it.
        if (this.#ended) throw new Error("the session ended: log in again");
        this.#tokens = tokens;
        this.#expiresAt = Date.now() + tokens.expires_in * 1000;
        this.#claims = decodeClaims(tokens.access_token);
        this.#keep();
        this.#schedule();
        for (const listener of this.#listeners) listener(tokens);
        return tokens;
      } catch (error) {
        if (error instanceof ProblemError && error.status === 401) this.#end();
        else this.#schedule(5_000); // the server is unreachable or busy: try again soon
        throw error;
      } finally {
        this.#inflight = null;
      }
    })();
    return this.#inflight;
  }

  /** Calls `listener` with each new token pair, and with `null` when the session ends. */
  onChange(listener: Listener): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /** Ends the session on the server (`POST /v1/auth/logout`) and here. */
  async logout(): Promise<void> {
    if (this.#ended) return;
    const fetcher = this.#options.fetch ?? fetch;
    try {
      await fetcher(`${this.#options.baseUrl}/v1/auth/logout`, {
        method: "POST",
        headers: {
          authorization: `Bearer ${this.#tokens.access_token}`,
          "content-type": "application/json",
        },
        body: JSON.stringify({ refresh_token: this.#tokens.refresh_token }),
      });
    } finally {
      this.#end();
    }
  }

  /** Stops the refresh timer without ending the session on the server. */
  close(): void {
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = null;
  }

  #margin(): number {
    const lifetime = this.#tokens.expires_in;
    return Math.min(this.#options.refreshMarginSeconds, lifetime / 3);
  }

  #schedule(delayMs?: number): void {
    this.close();
    if (this.#ended) return;
    const due = delayMs ?? Math.max(0, this.#expiresAt - this.#margin() * 1000 - Date.now());
    this.#timer = setTimeout(() => {
      this.refresh().catch(() => {
        /* heard by listeners (401) or retried (#schedule) */
      });
    }, due);
    // In Node, a pending refresh does not keep the process alive.
    (this.#timer as { unref?: () => void }).unref?.();
  }

  #keep(): void {
    this.#options.store?.setItem(this.#options.storeKey, this.#tokens.refresh_token);
  }

  #end(): void {
    if (this.#ended) return;
    this.#ended = true;
    this.close();
    this.#options.store?.removeItem(this.#options.storeKey);
    for (const listener of this.#listeners) listener(null);
  }
}

/** Decodes a JWT's payload (base64url JSON, RFC 7519 section 7.2) without verifying it. */
export function decodeClaims(jwt: string): AccessClaims {
  const payload = jwt.split(".")[1] ?? "";
  const base64 = payload.replace(/-/g, "+").replace(/_/g, "/");
  const padded = base64 + "=".repeat((4 - (base64.length % 4)) % 4);
  const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
  return JSON.parse(new TextDecoder().decode(bytes)) as AccessClaims;
}

/** Reads a refusal's problem document (RFC 9457), or makes one from the status. */
export async function problemOf(response: Response): Promise<Problem> {
  const type = response.headers.get("content-type") ?? "";
  if (/^application\/(problem\+)?json/i.test(type)) {
    try {
      return (await response.json()) as Problem;
    } catch {
      /* fall through */
    }
  }
  return {
    type: "about:blank",
    title: response.statusText,
    status: response.status,
    detail: `HTTP ${response.status}`,
  };
}

async function post(options: SessionOptions, path: string, body: unknown): Promise<TokenPair> {
  const fetcher = options.fetch ?? fetch;
  const response = await fetcher(`${options.baseUrl.replace(/\/+$/, "")}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!response.ok) throw new ProblemError(response.status, await problemOf(response));
  return (await response.json()) as TokenPair;
}
