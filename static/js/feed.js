// The tenant's event feed: ONE EventSource on /events for every job on the page.
//
// EventSource cannot send headers, so the API key is exchanged for a short-lived stream token
// (POST /tokens) that goes in the URL. Before the token expires a second EventSource is opened
// with a new token, resuming after the last event id (?last_event_id=); when it is open the old
// one is closed. Events are dropped unless they come from the current source and are newer than
// the last one handled (ids are ordered positions in the tenant's log), so the overlap neither
// loses nor repeats anything.
//
// Dropped connections: the browser reconnects by itself with Last-Event-ID (server restarts,
// network blips), and the server replays what was missed. When the browser gives up — the
// server answered something other than a stream — we find out why with a plain request to the
// same URL: 401/403 means the token expired (get a new one), 410 means our last id is older than
// the capped log (reload the list and start over without an id), anything else is retried with
// backoff.
//
// The feed asks for overview events too (?overview=true): the live header's counts, workers and
// queue depth ride on this same EventSource, so the page never polls for them. They carry no id
// (they are not in the log), so they bypass the id check below.

const EVENT_NAMES = [
  "job.queued", "job.processing", "job.progress", "job.retrying", "job.completed", "job.failed", "job.cancelled",
];
const RENEW_MARGIN_MS = 5 * 60 * 1000;
const MIN_RENEW_MS = 5 * 1000;
const OFFLINE_AFTER_MS = 10 * 1000;
const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 15 * 1000;

export function compareIds(a, b) {
  const [am, as = "0"] = a.split("-");
  const [bm, bs = "0"] = b.split("-");
  return Number(am) - Number(bm) || Number(as) - Number(bs);
}

export class Feed {
  /**
   * onEvent(name, data, id): an event to apply. onState(state): "connecting" | "live" |
   * "reconnecting" | "offline". onResync(): events may have been missed; reload the state.
   * onAuthFailed(): the API key itself is no longer accepted. onOverview(data): the tenant's
   * counts by status, workers alive and queue depth.
   */
  constructor(api, { onEvent, onState, onResync, onAuthFailed, onOverview }) {
    this.api = api;
    this.handlers = { onEvent, onState, onResync, onAuthFailed, onOverview };
    this.source = null;
    this.pending = null;
    this.token = null;
    this.lastId = null;
    this.state = null;
    this.downSince = null;
    this.retryMs = RETRY_MIN_MS;
    this.timers = new Set();
    this.stopped = true;
    this.ready = new Promise((resolve) => (this.resolveReady = resolve));
    this.onOnline = () => {
      if (!this.source && !this.stopped) this.connect();
    };
  }

  start() {
    this.stopped = false;
    window.addEventListener("online", this.onOnline);
    this.ticker = setInterval(() => this.updateDownState(), 1000);
    this.setState("connecting");
    this.connect();
  }

  stop() {
    this.stopped = true;
    window.removeEventListener("online", this.onOnline);
    clearInterval(this.ticker);
    for (const timer of this.timers) clearTimeout(timer);
    this.timers.clear();
    this.source?.close();
    this.pending?.close();
    this.source = this.pending = null;
  }

  later(fn, ms) {
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      if (!this.stopped) fn();
    }, ms);
    this.timers.add(timer);
  }

  setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.handlers.onState(state);
  }

  updateDownState() {
    if (this.state === "live" || this.downSince === null) return;
    if (!navigator.onLine || Date.now() - this.downSince > OFFLINE_AFTER_MS) this.setState("offline");
  }

  markDown() {
    if (this.downSince === null) this.downSince = Date.now();
    this.setState(navigator.onLine ? "reconnecting" : "offline");
    this.updateDownState();
  }

  async newToken() {
    const { token, expires_at: expiresAt } = await this.api.createToken();
    this.token = token;
    const lifetime = Date.parse(expiresAt) - Date.now();
    const margin = Math.min(RENEW_MARGIN_MS, lifetime / 10);
    return { token, renewInMs: Math.max(MIN_RENEW_MS, lifetime - margin) };
  }

  url(token, withId) {
    const query = new URLSearchParams({ token, overview: "true" });
    if (withId && this.lastId) query.set("last_event_id", this.lastId);
    return `/events?${query}`;
  }

  open(url) {
    const source = new EventSource(url);
    for (const name of EVENT_NAMES) source.addEventListener(name, (event) => this.receive(source, event));
    source.addEventListener("overview", (event) => this.overview(source, event));
    source.addEventListener("open", () => this.opened(source));
    source.addEventListener("error", () => this.failed(source));
    return source;
  }

  /** (Re)connect from scratch: a fresh token, resuming after the last id when we have one. */
  async connect({ resume = true } = {}) {
    this.source?.close();
    this.source = null;
    let renewInMs;
    try {
      ({ renewInMs } = await this.newToken());
    } catch (error) {
      if (this.stopped) return;
      if (error.status === 401) return this.handlers.onAuthFailed();
      this.markDown();
      return this.retryLater();
    }
    if (this.stopped) return;
    if (!resume || !this.lastId) {
      // Without an id the feed starts live: whatever happened while we were away must be reloaded.
      if (this.everOpened) this.handlers.onResync();
      if (!resume) this.lastId = null;
    }
    this.source = this.open(this.url(this.token, resume));
    this.scheduleRenewal(renewInMs);
  }

  retryLater() {
    const delay = this.retryMs;
    this.retryMs = Math.min(this.retryMs * 2, RETRY_MAX_MS);
    this.later(() => this.connect(), delay);
  }

  scheduleRenewal(ms) {
    clearTimeout(this.renewTimer);
    this.timers.delete(this.renewTimer);
    this.renewTimer = setTimeout(() => {
      this.timers.delete(this.renewTimer);
      if (!this.stopped) this.renew();
    }, ms);
    this.timers.add(this.renewTimer);
  }

  /** Open a second source with a new token; the switch happens when it is open (opened()). */
  async renew() {
    let renewInMs;
    try {
      ({ renewInMs } = await this.newToken());
    } catch (error) {
      if (error.status === 401) return this.handlers.onAuthFailed();
      return this.scheduleRenewal(10 * 1000);
    }
    if (this.stopped) return;
    if (!this.source) return this.connect(); // down anyway: a plain reconnect with the new token
    this.pending?.close();
    this.pending = this.open(this.url(this.token, true));
    this.scheduleRenewal(renewInMs);
  }

  opened(source) {
    if (source === this.pending) {
      this.source?.close();
      this.source = source;
      this.pending = null;
    }
    if (source !== this.source) return;
    this.downSince = null;
    this.retryMs = RETRY_MIN_MS;
    this.everOpened = true;
    this.setState("live");
    this.resolveReady();
  }

  receive(source, event) {
    if (source !== this.source) return;
    if (event.lastEventId) {
      if (this.lastId && compareIds(event.lastEventId, this.lastId) <= 0) return; // seen already
      this.lastId = event.lastEventId;
    }
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return;
    }
    this.handlers.onEvent(event.type, data, event.lastEventId);
  }

  overview(source, event) {
    if (source !== this.source) return;
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return; // a malformed overview is skipped; the next one replaces it
    }
    this.handlers.onOverview?.(data);
  }

  failed(source) {
    if (source === this.pending) {
      // The renewal did not connect; keep the current source and try again shortly.
      source.close();
      this.pending = null;
      return this.scheduleRenewal(10 * 1000);
    }
    if (source !== this.source || this.stopped) return;
    this.markDown();
    if (source.readyState === EventSource.CONNECTING) return; // the browser retries with Last-Event-ID
    // The browser gave up: the server answered, but not with a stream. Ask it why.
    this.source = null;
    this.diagnose(this.url(this.token, true));
  }

  async diagnose(url) {
    let status = 0;
    const controller = new AbortController();
    try {
      const response = await fetch(url, { signal: controller.signal, headers: { Accept: "text/event-stream" } });
      status = response.status;
      controller.abort(); // a 200 is a stream: we only wanted its status
    } catch {
      status = 0;
    }
    if (this.stopped) return;
    if (status === 410) return this.connect({ resume: false });
    if (status === 401 || status === 403) return this.connect();
    if (status === 200) return this.connect();
    this.retryLater();
  }
}
