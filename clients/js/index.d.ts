// Types of jssocket-client (src/index.js). Hand-written: the source is plain JavaScript so that
// the server embeds its browser bundle without a build step; keep the two in step.

export interface Backoff {
  /** First step's upper bound (ms). Default 500. */
  minDelay: number;
  /** Largest upper bound (ms). Default 20000. */
  maxDelay: number;
  /** Growth of the upper bound per attempt. Default 2. */
  factor: number;
}

export const DEFAULT_BACKOFF: Readonly<Backoff>;
export const STABLE_MS: number;
export const DEFAULT_INVOKE_TIMEOUT: number;

/** The default reconnect policy (see README "Close codes"). */
export function defaultShouldReconnect(code: number, reason: string, refreshable?: boolean): boolean;
/** Full jitter: uniformly random in [0, min(maxDelay, minDelay * factor^attempt)]. */
export function backoffDelay(attempt: number, backoff?: Backoff, random?: () => number): number;

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A position in a history channel (SPEC §13). */
export interface Position {
  offset: number;
  epoch: string;
}

export interface PublishEvent {
  channel: string;
  data: Json;
  /** Set on a history channel, else null. */
  offset: number | null;
  epoch: string | null;
  /** The whole frame's JSON text, as received. */
  raw: string;
}

export interface SubscribedEvent {
  channel: string;
  /** true: the missed publications follow; false: they are lost, reload; null: nothing to recover. */
  recovered: boolean | null;
  epoch: string | null;
  offset: number | null;
}

export interface ServerError {
  /** The relay's error code (`forbidden`, `invalid_token`, …), or `transport` / `token`. */
  code: string;
  message: string;
  /** The event the error answers, when the relay names it. */
  event?: string;
  /** The channel of a refused subscribe or unsubscribe. */
  channel?: string;
  data?: Json;
}

export interface ClosedEvent {
  code: number;
  reason: string;
  /** Whether the client will connect again (after `delay` ms). */
  reconnect: boolean;
  delay: number | null;
}

export interface AcknowledgedEvent {
  target: string | null;
  roles: string[];
  groups: string[];
  /** The whole `client_connected` data the backend sent. */
  data: { [key: string]: Json };
}

export interface ClientEvents {
  connecting: { attempt: number };
  /** Connected; `client_connect` (when registering) and the subscriptions are sent. */
  open: { registered: boolean };
  acknowledged: AcknowledgedEvent;
  closed: ClosedEvent;
  error: ServerError;
  /** `kind`: the event that sent it (labelled connections), null for a bare payload. */
  notify: { data: Json; raw: string; kind: 'notify_client' | 'notify_group' | 'notify_all' | null };
  publish: PublishEvent;
  subscribed: SubscribedEvent;
  unsubscribed: { channel: string };
  callback: { data: Json };
  message: { type: string; data: Json; raw: string };
}

export interface SubscriptionEvents {
  subscribed: SubscribedEvent;
  publish: PublishEvent;
  error: ServerError;
  unsubscribed: { channel: string };
}

declare class Emitter<Events> {
  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof Events>(type: K, listener: (event: Events[K]) => void): () => void;
  once<K extends keyof Events>(type: K, listener: (event: Events[K]) => void): () => void;
  off<K extends keyof Events>(type: K, listener: (event: Events[K]) => void): void;
}

export class Subscription extends Emitter<SubscriptionEvents> {
  readonly client: JssocketClient;
  readonly name: string;
  state: 'pending' | 'subscribed' | 'unsubscribed';
  /** The last delivered position on a history channel. */
  position: Position | null;
  unsubscribe(): void;
}

export interface ClientOptions extends Partial<Backoff> {
  /** Sent in `client_connect`; a function is asked again at every connect (token refresh). */
  token?: string | (() => string | Promise<string>);
  /** More fields for `client_connect`'s data. */
  connectData?: { [key: string]: Json };
  /** false: do not send `client_connect` (default true; false when `auth` is set). */
  register?: boolean;
  /** Add `labels=1` to the URL so notify payloads come labelled (default true). */
  labels?: boolean;
  /** The admin password, sent as the `auth` header at the upgrade (Node only). */
  auth?: string;
  /** A WebSocket constructor (default: globalThis.WebSocket). */
  WebSocket?: new (url: string, options?: any) => any;
  /** Replaces the default reconnect policy. */
  shouldReconnect?: (code: number, reason: string) => boolean;
  /** Default `invoke` timeout (ms), 15000. */
  invokeTimeout?: number;
  /** Random source in [0, 1) for the jitter (tests). */
  random?: () => number;
}

export type PublishFilter =
  | {}
  | { roles: string[] }
  | { groups: string[] }
  | { users: string[] }
  | { clients: string[] };

export interface InvokeError extends Error {
  /** `timeout`, `no_server`, `rate_limited`, `invalid_field`, `disconnected`, `not_connected`, or `error`. */
  code: string;
  detail: Json;
}

export class JssocketClient extends Emitter<ClientEvents> {
  constructor(url: string, options?: ClientOptions);
  readonly url: string;
  readonly backoff: Backoff;
  state: 'idle' | 'connecting' | 'open' | 'waiting';
  /** This connection's id once acknowledged. */
  target: string | null;
  acknowledged: boolean;
  /** Whether `client_connect` was sent on the current connection. */
  readonly registered: boolean;
  readonly subscriptions: Map<string, Subscription>;
  connect(): void;
  close(code?: number, reason?: string): void;
  /** Sends `client_connect` again (e.g. with a fresher token) on the open connection. */
  register(): Promise<boolean>;
  send(type: string, data: Json): boolean;
  subscribe(name: string, options?: { since?: Position }): Subscription;
  unsubscribe(name: string): void;
  invoke<T = Json>(method: string, data?: Json, options?: { timeout?: number }): Promise<T>;
  notifyClient(target: string, data: Json, options?: { callback?: Json }): boolean;
  notifyGroup(target: string, data: Json, options?: { callback?: Json }): boolean;
  notifyAll(data: Json): boolean;
  publish(name: string, data: Json, filter?: PublishFilter): boolean;
}

export class JssocketAdmin {
  constructor(base: string, password: string, options?: { fetch?: typeof fetch });
  post(event: string, body: Json): Promise<any>;
  notifyClient(target: string, data: Json): Promise<{ delivered: number }>;
  notifyGroup(target: string, data: Json): Promise<{ delivered: number }>;
  notifyAll(data: Json): Promise<{ delivered: number }>;
  publish(name: string, data: Json, filter?: PublishFilter): Promise<{ delivered: number }>;
  invokeResult(target: string, id: string | number, result: { data: Json } | { error: Json }): Promise<{ delivered: number }>;
}
