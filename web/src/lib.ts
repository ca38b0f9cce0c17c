// What every view shares: the signed-in context (session, typed API, live client), the
// fragment router, the live-topic hook and small formatting helpers.
import {
  type Api,
  type LiveClient,
  ProblemError,
  type Session,
  type Topic,
  type TopicDocument,
} from "@essayflow/client";
import { createContext } from "preact";
import { useContext, useEffect, useRef, useState } from "preact/hooks";

export interface SignedIn {
  session: Session;
  api: Api;
  live: LiveClient;
}

export const Context = createContext<SignedIn | null>(null);

/** The signed-in context (views render only when signed in). */
export function useSignedIn(): SignedIn {
  const value = useContext(Context);
  if (!value) throw new Error("useSignedIn outside a signed-in view");
  return value;
}

/** A view and its parameters, from the URL fragment (`#/batches/<id>`). */
export type Route =
  | { view: "dashboard" }
  | { view: "new" }
  | { view: "batch"; id: string }
  | { view: "history"; id: string }
  | { view: "admin" }
  | { view: "missing"; path: string };

export function parseRoute(hash: string): Route {
  const path = hash.replace(/^#/, "") || "/";
  if (path === "/") return { view: "dashboard" };
  if (path === "/new") return { view: "new" };
  if (path === "/admin") return { view: "admin" };
  const batch = path.match(/^\/batches\/([0-9a-fA-F-]{36})(\/history)?$/);
  if (batch) return batch[2] ? { view: "history", id: batch[1]! } : { view: "batch", id: batch[1]! };
  return { view: "missing", path };
}

export function useRoute(): Route {
  const [hash, setHash] = useState(location.hash);
  useEffect(() => {
    const changed = () => setHash(location.hash);
    addEventListener("hashchange", changed);
    return () => removeEventListener("hashchange", changed);
  }, []);
  return parseRoute(hash);
}

export function go(path: string): void {
  location.hash = `#${path}`;
}

/**
 * Positions of commands this page just made (202s), by batch id: a view that follows the batch
 * subscribes with `min_position`, so that a batch registered a moment ago is found.
 */
export const positions = new Map<string, number>();

export interface TopicState<T extends Topic> {
  document?: TopicDocument<T>;
  version?: number;
  /** The server refused the topic: `not_found` (no such batch, or someone else's). */
  refused?: string;
}

/**
 * Follows a live topic. The document is patched in place by the live client; the view renders at
 * most once per animation frame, however many changes arrive in it.
 */
export function useTopic<T extends Topic>(topic: T | null, minPosition?: number): TopicState<T> {
  const { live } = useSignedIn();
  const [state, setState] = useState<TopicState<T>>({});
  useEffect(() => {
    if (!topic) return;
    setState({});
    let frame = 0;
    const subscription = live.subscribe(
      topic,
      {
        update: () => {
          frame ||= requestAnimationFrame(() => {
            frame = 0;
            const current = subscription.current();
            if (current) setState({ document: current.document, version: current.version });
          });
        },
        refused: (error) => setState({ refused: error.code }),
      },
      { minPosition },
    );
    return () => {
      if (frame) cancelAnimationFrame(frame);
      subscription.unsubscribe();
    };
  }, [live, topic]);
  return state;
}

/** What to tell a person about a refused or failed call. */
export function describe(error: unknown): string {
  if (error instanceof ProblemError) {
    const fields = error.problem.errors?.map((e) => `${e.field}: ${e.reason}`).join("; ");
    if (error.status === 429 || error.status === 503) {
      return `${error.problem.detail} (try again shortly)`;
    }
    return fields ? `${error.problem.detail}: ${fields}` : error.problem.detail;
  }
  if (error instanceof TypeError) return "The server cannot be reached; check your connection.";
  return String(error);
}

/** Runs `action`, keeping whether it is running and what went wrong. */
export function useAction() {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const mounted = useRef(true);
  useEffect(() => () => void (mounted.current = false), []);
  const run = async <T,>(action: () => Promise<T>): Promise<T | undefined> => {
    setBusy(true);
    setError(null);
    try {
      return await action();
    } catch (e) {
      if (mounted.current) setError(describe(e));
      return undefined;
    } finally {
      if (mounted.current) setBusy(false);
    }
  };
  return { busy, error, run };
}

const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
export function when(iso: string | null | undefined): string {
  return iso ? dateTime.format(new Date(iso)) : "";
}

const ACRONYMS = new Set(["ai", "cj", "nlp"]);
/** `ai_feedback` -> `AI feedback`, `nlp` -> `NLP`, `spellcheck` -> `Spellcheck`. */
export function label(name: string): string {
  return name
    .split("_")
    .map((w, i) => (ACRONYMS.has(w) ? w.toUpperCase() : i === 0 ? w.charAt(0).toUpperCase() + w.slice(1) : w))
    .join(" ");
}

/** Moves the focus to the view's heading when the view changes (screen readers announce it). */
export function useFocusHeading(key: string) {
  const heading = useRef<HTMLHeadingElement>(null);
  useEffect(() => {
    heading.current?.focus();
  }, [key]);
  return heading;
}
