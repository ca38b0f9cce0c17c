// The typed REST client: openapi-fetch over the generated `paths` of /openapi.json, with the
// session's access token on every request and one refresh-and-retry on a 401.
import createClient, { type Client, type Middleware } from "openapi-fetch";
import type { paths } from "./schema.js";
import { ProblemError, type Problem, type Session } from "./session.js";

/** The REST client: `api.GET("/v1/batches/{id}", { params: { path: { id } } })` and so on. */
export type Api = Client<paths>;

export interface ApiOptions {
  /** The server's origin, e.g. `https://essayflow.example`. */
  baseUrl: string;
  /** Authenticates every request (without one, only login and refresh work). */
  session?: Session;
  /** The fetch to use (default: the global one). */
  fetch?: typeof fetch;
}

/**
 * Makes the typed client. Every answer is `{ data, error, response }`: `data` on a 2xx, `error`
 * (the RFC 9457 problem) otherwise; {@link unwrap} turns the latter into a {@link ProblemError}.
 */
export function createApi(options: ApiOptions): Api {
  const api = createClient<paths>({
    baseUrl: options.baseUrl.replace(/\/+$/, ""),
    ...(options.fetch ? { fetch: options.fetch } : {}),
  });
  if (options.session) api.use(authenticate(options.session, options.fetch ?? fetch));
  return api;
}

/**
 * Sets `Authorization: Bearer <access token>` (refreshed first when it is about to expire); on a
 * 401, refreshes once and repeats the request with the new token. A second 401, or a refused
 * refresh (the session ended), is answered as it is.
 */
function authenticate(session: Session, fetcher: typeof fetch): Middleware {
  const copies = new WeakMap<Request, Request>();
  return {
    async onRequest({ request }) {
      if (session.ended) return request;
      request.headers.set("authorization", `Bearer ${await session.token()}`);
      copies.set(request, request.clone());
      return request;
    },
    async onResponse({ request, response }) {
      const copy = copies.get(request);
      if (response.status !== 401 || !copy || session.ended) return response;
      const sentWith = copy.headers.get("authorization");
      try {
        // Another request may have refreshed meanwhile: then retry with its token.
        if (sentWith === `Bearer ${session.accessToken}`) await session.refresh();
      } catch {
        return response;
      }
      copy.headers.set("authorization", `Bearer ${session.accessToken}`);
      return fetcher(copy);
    },
  };
}

/**
 * The data of a 2xx answer, or throws its problem.
 * @throws {ProblemError} the status and problem document of a refusal.
 */
export function unwrap<T>(result: { data?: T; error?: unknown; response: Response }): T {
  if (result.response.ok && result.data !== undefined) return result.data;
  if (result.response.ok) return undefined as T; // 204
  const problem = (result.error ?? {
    type: "about:blank",
    title: result.response.statusText,
    status: result.response.status,
    detail: `HTTP ${result.response.status}`,
  }) as Problem;
  throw new ProblemError(result.response.status, problem);
}
