// The live client of GET /v1/ws (docs/websocket.md): subscribes to topics, keeps each topic's
// document by applying the server's RFC 6902 patches (fast-json-patch), and never misses a
// version: after a disconnect or a `lagged` message it subscribes again with `since`, and the
// server sends exactly what it missed (or a snapshot). It refreshes the connection's token
// before the access token expires (a `refresh` message) and reconnects with a fresh token when
// the connection closed anyway.
// The default export: fast-json-patch is CommonJS for Node ("main") and ESM for bundlers ("module").
import jsonpatch, { type Operation } from "fast-json-patch";
import type { ClientMessage, ErrorMessage, ServerMessage, Subscribe } from "./protocol.js";
import type { components } from "./schema.js";

/** A topic: the caller's dashboard, or one batch. */
export type Topic = "dashboard" | `batch:${string}`;

/** The document of a topic: what `GET /v1/dashboard` or `GET /v1/batches/{id}` answers. */
export type TopicDocument<T extends Topic> = T extends "dashboard"
  ? components["schemas"]["Dashboard"]
  : components["schemas"]["BatchView"];

/** What the connection is doing. */
export type LiveStatus =
  | "connecting"
  | "open"
  /** Closed unexpectedly; trying again after a back-off. */
  | "reconnecting"
  /** The server closed it with 4403: the user lost access. Log in again. */
  | "revoked"
  /** Closed by {@link LiveClient.close}, or the session ended. */
  | "closed";

/* eslint-disable @typescript-eslint/no-explicit-any */
/**
 * The part of a WebSocket the client uses: the browser's `WebSocket` and `ws`'s both fit (the
 * handlers' events are typed loosely so that either assigns; the client reads `data` of a
 * message event and `code` and `reason` of a close event).
 */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: any) => void) | null;
  onclose: ((event: any) => void) | null;
  onerror: ((event: any) => void) | null;
}
/* eslint-enable @typescript-eslint/no-explicit-any */

/** Where tokens come from: a {@link Session} fits. */
export interface TokenSource {
  /** A valid access token (refreshed first if it is about to expire). */
  token(): Promise<string>;
  /** Forces a refresh (after the server refused the token). */
  refresh(): Promise<unknown>;
  /** Called with each new pair, or `null` when the session ended. */
  onChange(listener: (tokens: { access_token: string } | null) => void): () => void;
}

export interface LiveOptions {
  /** `ws://` or `wss://` URL of `/v1/ws` ({@link liveUrl} makes it from the server's origin). */
  url: string;
  tokens: TokenSource;
  /**
   * Opens a socket with the given sub-protocols (default: the global `WebSocket`). In Node 20,
   * pass `(url, protocols) => new WebSocket(url, protocols)` of the `ws` package.
   */
  connect?: (url: string, protocols: string[]) => WebSocketLike;
  /** The first reconnect waits this long, doubling up to `maxDelayMs` (defaults 250 and 10 000). */
  initialDelayMs?: number;
  maxDelayMs?: number;
  /** Hears every status change. */
  onStatus?: (status: LiveStatus) => void;
  /** Hears every message the server sends (for logging and tests). */
  onMessage?: (message: ServerMessage) => void;
}

/** What a topic's listener hears. */
export interface TopicListener<T extends Topic> {
  /**
   * The document changed. `cause` is `snapshot` (the whole document arrived) or `change` (a patch
   * was applied to it, in place: copy what you keep). `version` is the topic's version.
   */
  update(document: TopicDocument<T>, version: number, cause: "snapshot" | "change"): void;
  /** The server refused the subscription (`not_found`: no such batch, or someone else's). */
  refused?(error: ErrorMessage): void;
}

/** A subscription: its current document, and a way to end it. */
export interface Subscription<T extends Topic> {
  readonly topic: T;
  /** The current document and version, once a snapshot arrived. */
  current(): { document: TopicDocument<T>; version: number } | undefined;
  unsubscribe(): void;
}

interface TopicState {
  version?: number;
  document?: unknown;
  minPosition?: number;
  listeners: Set<TopicListener<Topic>>;
  /** Refused by the server (kept for listeners added later); not subscribed again on reconnect. */
  refused?: ErrorMessage;
}

/** `wss://host/v1/ws` from `https://host` (and `ws://` from `http://`). */
export function liveUrl(baseUrl: string): string {
  const url = new URL("/v1/ws", baseUrl);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.toString();
}

const OPEN = 1;
/** The sub-protocol the server selects; the token travels as a second entry. */
export const SUBPROTOCOL = "essayflow.v1";

/**
 * One connection to `/v1/ws`, shared by every subscription. Connects on the first
 * {@link LiveClient.subscribe}; reconnects (with back-off and a fresh token) until
 * {@link LiveClient.close}, the session ends or the server revokes access (4403).
 */
export class LiveClient {
  #socket: WebSocketLike | null = null;
  #topics = new Map<Topic, TopicState>();
  #status: LiveStatus = "closed";
  #closed = false;
  #attempt = 0;
  #retry: ReturnType<typeof setTimeout> | null = null;
  /** A connection is being opened (waiting for a token): no second one may start meanwhile. */
  #connecting = false;
  #unlisten: () => void;
  readonly #options: LiveOptions;

  constructor(options: LiveOptions) {
    this.#options = options;
    this.#unlisten = options.tokens.onChange((tokens) => {
      if (tokens === null) this.#stop("closed");
      else this.#send({ type: "refresh", token: tokens.access_token });
    });
  }

  /** The connection's status. */
  get status(): LiveStatus {
    return this.#status;
  }

  /**
   * Follows `topic`. `minPosition` (the `position` of a 202) makes the server wait until the
   * read models applied that write before answering, so a batch registered a moment ago can be
   * followed at once.
   */
  subscribe<T extends Topic>(
    topic: T,
    listener: TopicListener<T>,
    options: { minPosition?: number } = {},
  ): Subscription<T> {
    let state = this.#topics.get(topic);
    const fresh = !state;
    if (!state) {
      state = { listeners: new Set(), minPosition: options.minPosition };
      this.#topics.set(topic, state);
    }
    const known = state;
    const any = listener as unknown as TopicListener<Topic>;
    known.listeners.add(any);
    if (fresh) {
      this.#subscribe(topic, known);
    } else if (known.refused) {
      const refused = known.refused;
      queueMicrotask(() => known.listeners.has(any) && listener.refused?.(refused));
    } else if (options.minPosition !== undefined && known.document !== undefined) {
      // A newer write to wait for: the server answers once the read model has it.
      known.minPosition = options.minPosition;
      this.#subscribe(topic, known);
    }
    if (!fresh && known.document !== undefined && known.version !== undefined) {
      // After `subscribe` returns, as for a new topic.
      queueMicrotask(() => {
        if (known.listeners.has(any) && known.document !== undefined && known.version !== undefined) {
          listener.update(known.document as TopicDocument<T>, known.version, "snapshot");
        }
      });
    }
    this.#ensureConnected();
    return {
      topic,
      current: () =>
        known.document === undefined || known.version === undefined
          ? undefined
          : { document: known.document as TopicDocument<T>, version: known.version },
      unsubscribe: () => {
        known.listeners.delete(any);
        if (known.listeners.size === 0 && this.#topics.get(topic) === known) {
          this.#topics.delete(topic);
          if (!known.refused) this.#send({ type: "unsubscribe", topic });
        }
      },
    };
  }

  /** Closes the connection for good (subscriptions end). */
  close(): void {
    this.#stop("closed");
  }

  #stop(status: LiveStatus): void {
    this.#closed = true;
    this.#unlisten();
    if (this.#retry) clearTimeout(this.#retry);
    this.#retry = null;
    const socket = this.#socket;
    this.#socket = null;
    if (socket) {
      socket.onclose = null;
      socket.onmessage = null;
      socket.close(1000, "client closed");
    }
    this.#setStatus(status);
  }

  #setStatus(status: LiveStatus): void {
    if (this.#status === status) return;
    this.#status = status;
    this.#options.onStatus?.(status);
  }

  #ensureConnected(): void {
    if (this.#closed || this.#socket || this.#retry || this.#connecting) return;
    void this.#connect();
  }

  async #connect(): Promise<void> {
    this.#connecting = true;
    this.#setStatus(this.#attempt === 0 ? "connecting" : "reconnecting");
    let token: string;
    try {
      // After two failed attempts in a row the token may be the reason: refresh it.
      if (this.#attempt >= 2) await this.#options.tokens.refresh();
      token = await this.#options.tokens.token();
    } catch {
      this.#connecting = false;
      if (!this.#closed) this.#later();
      return;
    }
    this.#connecting = false;
    if (this.#closed) return;
    const connect =
      this.#options.connect ??
      ((url: string, protocols: string[]) =>
        new (globalThis as unknown as { WebSocket: new (u: string, p: string[]) => WebSocketLike }).WebSocket(
          url,
          protocols,
        ));
    const socket = connect(this.#options.url, [SUBPROTOCOL, `bearer.${token}`]);
    this.#socket = socket;
    socket.onopen = () => {
      this.#setStatus("open");
      for (const [topic, state] of this.#topics) if (!state.refused) this.#subscribe(topic, state);
    };
    socket.onmessage = (event) => {
      if (typeof event.data !== "string") return;
      this.#receive(JSON.parse(event.data) as ServerMessage);
    };
    socket.onerror = () => {
      /* followed by onclose */
    };
    socket.onclose = (event) => {
      if (this.#socket !== socket) return;
      this.#socket = null;
      if (event.code === 4403) return this.#stop("revoked");
      if (this.#closed) return;
      // The token expired (1008 "the access token expired"): refresh before reconnecting.
      if (event.code === 1008 && /expired/i.test(String(event.reason))) this.#attempt = Math.max(this.#attempt, 2);
      this.#later();
    };
  }

  #later(): void {
    this.#setStatus("reconnecting");
    const initial = this.#options.initialDelayMs ?? 250;
    const max = this.#options.maxDelayMs ?? 10_000;
    const delay = Math.min(max, initial * 2 ** Math.min(this.#attempt, 16));
    this.#attempt += 1;
    // Full jitter, so that clients a restart disconnected do not return all at once.
    this.#retry = setTimeout(
      () => {
        this.#retry = null;
        this.#ensureConnected();
      },
      delay / 2 + Math.random() * (delay / 2),
    );
  }

  #subscribe(topic: Topic, state: TopicState): void {
    const message: Subscribe = { type: "subscribe", topic };
    if (state.document !== undefined && state.version !== undefined) message.since = state.version;
    else if (state.minPosition !== undefined) message.min_position = state.minPosition;
    this.#send(message);
  }

  #send(message: ClientMessage): void {
    const socket = this.#socket;
    if (socket && socket.readyState === OPEN) socket.send(JSON.stringify(message));
  }

  #receive(message: ServerMessage): void {
    this.#options.onMessage?.(message);
    switch (message.type) {
      case "snapshot": {
        this.#attempt = 0;
        const state = this.#topics.get(message.topic as Topic);
        if (!state) return;
        state.document = message.data;
        state.version = message.version;
        state.minPosition = undefined;
        this.#notify(state, "snapshot");
        return;
      }
      case "change": {
        this.#attempt = 0;
        const state = this.#topics.get(message.topic as Topic);
        if (!state || state.document === undefined || state.version === undefined) return;
        if (message.version <= state.version) return; // already applied (a resume's overlap)
        if (message.version !== state.version + 1) {
          // A gap: cannot happen with a correct server; ask for what is missing.
          this.#subscribe(message.topic as Topic, state);
          return;
        }
        try {
          // Validated and in place: the cost follows the patch, not the document's size.
          state.document = jsonpatch.applyPatch(state.document, message.patch as Operation[], true, true).newDocument;
        } catch {
          // Cannot happen with a correct client and server: start over from a snapshot.
          state.document = undefined;
          state.version = undefined;
          this.#subscribe(message.topic as Topic, state);
          return;
        }
        state.version = message.version;
        this.#notify(state, "change");
        return;
      }
      case "lagged": {
        // Changes were dropped because we read too slowly: ask for them again.
        const state = this.#topics.get(message.topic as Topic);
        if (state) this.#subscribe(message.topic as Topic, state);
        return;
      }
      case "error": {
        if (message.code === "not_found" || message.code === "invalid_topic") {
          const state = message.topic ? this.#topics.get(message.topic as Topic) : undefined;
          if (state) {
            state.refused = message;
            for (const listener of state.listeners) listener.refused?.(message);
          }
        } else if (message.code === "unavailable" && message.topic) {
          const topic = message.topic as Topic;
          const retry = setTimeout(() => {
            const state = this.#topics.get(topic);
            if (state) this.#subscribe(topic, state);
          }, 1_000);
          (retry as { unref?: () => void }).unref?.();
        }
        return;
      }
      default:
        return; // subscribed, unsubscribed, refreshed
    }
  }

  #notify(state: TopicState, cause: "snapshot" | "change"): void {
    for (const listener of state.listeners) listener.update(state.document as never, state.version!, cause);
  }
}
