// @essayflow/client: a typed client of essayflow's REST API (generated from /openapi.json) and
// its live WebSocket feed (docs/websocket.md).
export { createApi, unwrap, type Api, type ApiOptions } from "./api.js";
export {
  LiveClient,
  liveUrl,
  SUBPROTOCOL,
  type LiveOptions,
  type LiveStatus,
  type Subscription,
  type Topic,
  type TopicDocument,
  type TopicListener,
  type TokenSource,
  type WebSocketLike,
} from "./live.js";
export {
  Session,
  ProblemError,
  decodeClaims,
  problemOf,
  type AccessClaims,
  type Problem,
  type SessionOptions,
  type TokenPair,
  type TokenStore,
} from "./session.js";
export type * from "./protocol.js";
export type { components, operations, paths } from "./schema.js";

import type { components } from "./schema.js";
/** The component schemas of /openapi.json, by name: `Schemas["BatchView"]`. */
export type Schemas = components["schemas"];
