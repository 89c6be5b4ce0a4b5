// The dashboard: sign-in, routing between the jobs list (#/) and one job (#/jobs/ID), and the
// wiring of the one event feed to the table and the detail view.
//
// Start-up order matters for "nothing missed": the feed is opened first (it starts live, at the
// log's tip), the list is loaded when the feed is open, and events that arrive while the list
// loads are held and applied after it — the job state keeps the newer of the two.

import { Api, ApiError } from "./api.js";
import { DetailView } from "./detail.js";
import { h } from "./dom.js";
import { Feed } from "./feed.js";
import { SubmitForm } from "./form.js";
import { Jobs } from "./jobs.js";
import { OverviewBar } from "./overview.js";
import { JobTable } from "./table.js";

const KEY_STORAGE = "jobcast.apiKey";
const FEED_WAIT_MS = 3000;
const CONNECTION_LABELS = {
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
  offline: "Offline — retrying",
};

const $ = (id) => document.getElementById(id);

class App {
  constructor() {
    this.session = null;
    $("sign-in-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.signIn($("api-key").value.trim());
    });
    $("sign-out").addEventListener("click", () => this.signOut());
    this.offerDevKey();
    window.addEventListener("hashchange", () => this.route());
    setInterval(() => this.session?.tick(), 1000);
    document.addEventListener("visibilitychange", () => this.session?.tick());
  }

  /** Under `jobcast dev` the page names its default key (a meta tag the server adds), one click away. */
  offerDevKey() {
    const key = document.querySelector('meta[name="jobcast-dev-key"]')?.content;
    if (!key) return;
    $("dev-key-value").textContent = key;
    $("dev-key-hint").hidden = false;
    $("use-dev-key").addEventListener("click", () => {
      $("api-key").value = key;
      this.signIn(key);
    });
  }

  async boot() {
    // The key is kept for this tab only. Versions before 0.2 kept it in localStorage: forget it there.
    localStorage.removeItem(KEY_STORAGE);
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) await this.signIn(key, { stored: true });
    else this.showSignIn();
  }

  showSignIn(message = "") {
    $("sign-in-view").hidden = false;
    $("dashboard-view").hidden = true;
    $("detail-view").hidden = true;
    $("session-controls").hidden = true;
    $("overview").hidden = true;
    document.title = "Sign in · Jobcast";
    const error = $("api-key-error");
    error.textContent = message;
    error.hidden = !message;
    $("api-key").toggleAttribute("aria-invalid", Boolean(message));
    $("api-key").focus();
  }

  async signIn(key, { stored = false } = {}) {
    if (!key) return this.showSignIn("Enter your API key.");
    const api = new Api(key);
    let types;
    try {
      types = await api.jobTypes();
    } catch (error) {
      if (error.status === 401) {
        if (stored) sessionStorage.removeItem(KEY_STORAGE);
        return this.showSignIn(stored ? "Your saved API key is no longer accepted. Sign in again." : "This API key was not accepted.");
      }
      return this.showSignIn(error.message);
    }
    sessionStorage.setItem(KEY_STORAGE, key);
    $("api-key").value = "";
    this.session = new Session(this, api, types);
    $("sign-in-view").hidden = true;
    $("session-controls").hidden = false;
    $("overview").hidden = false;
    this.session.start();
    this.route();
  }

  signOut(message = "") {
    this.session?.stop();
    this.session = null;
    sessionStorage.removeItem(KEY_STORAGE);
    if (location.hash) history.replaceState(null, "", location.pathname);
    this.showSignIn(message);
  }

  route() {
    if (!this.session) return;
    const match = location.hash.match(/^#\/jobs\/([^/]+)$/);
    const detail = $("detail-view");
    if (match) {
      $("dashboard-view").hidden = true;
      detail.hidden = false;
      this.session.detail.show(decodeURIComponent(match[1]));
      $("main").focus({ preventScroll: true });
      window.scrollTo(0, 0);
    } else {
      const wasDetail = !detail.hidden;
      this.session.detail.hide();
      detail.hidden = true;
      $("dashboard-view").hidden = false;
      document.title = "Jobs · Jobcast";
      if (wasDetail) $("jobs-heading").focus?.();
    }
  }
}

/** Everything that lives while signed in; stop() leaves nothing running. */
class Session {
  constructor(app, api, types) {
    this.app = app;
    this.api = api;
    this.types = types;
    const jobs = (this.jobs = new Jobs());
    // Listeners on the page's lasting elements go when the session does (sign out, sign in again).
    this.lifetime = new AbortController();
    const signal = this.lifetime.signal;
    this.held = null; // events that arrived while the list was loading
    this.fetching = new Map(); // job id → events that arrived while it was being read
    const onError = (error) => this.error(error);
    this.table = new JobTable({
      api,
      jobs,
      body: $("jobs-body"),
      empty: $("jobs-empty"),
      loadMore: $("load-more"),
      statusFilter: $("filter-status"),
      typeFilter: $("filter-type"),
      searchFilter: $("filter-search"),
      onError,
      signal,
    });
    this.table.setTypes(types);
    this.form = new SubmitForm({ form: $("submit-form"), api, onSubmitted: (job) => this.submitted(job), signal });
    this.form.setTypes(types);
    this.detail = new DetailView({ api, jobs, container: $("detail-view"), toast, onError });
    this.detail.jobTypes = types;
    this.overview = new OverviewBar($("overview"));
    this.feed = new Feed(api, {
      onEvent: (name, data) => this.event(name, data),
      onOverview: (data) => this.overview.show(data),
      onState: (state) => {
        showConnection(state);
        if (state !== "live") this.overview.stale();
      },
      onResync: () => this.reload(),
      onAuthFailed: () => app.signOut("Your API key is no longer accepted. Sign in again."),
    });
  }

  async start() {
    this.feed.start();
    await Promise.race([this.feed.ready, new Promise((resolve) => setTimeout(resolve, FEED_WAIT_MS))]);
    if (this.stopped) return;
    await this.reload();
  }

  stop() {
    this.stopped = true;
    this.feed.stop();
    this.overview.clear();
    this.lifetime.abort();
    for (const id of ["jobs-body", "submit-form", "detail-view"]) $(id).replaceChildren();
  }

  async reload() {
    this.held ??= [];
    await this.table.reload();
    const held = this.held ?? [];
    this.held = null;
    for (const [name, data] of held) this.event(name, data);
  }

  event(name, data) {
    if (this.stopped) return;
    if (this.held) return void this.held.push([name, data]);
    const waiting = this.fetching.get(data.job_id);
    if (waiting) return void waiting.push([name, data]);
    const job = this.jobs.apply(name, data);
    if (!job && name === "job.queued") this.fetchNew(data.job_id, [[name, data]]);
  }

  /** A job born after the list was loaded: read it, then apply what happened to it meanwhile. */
  async fetchNew(id, events) {
    this.fetching.set(id, events);
    try {
      const job = this.jobs.put(await this.api.getJob(id));
      this.table.addNew(job);
    } catch (error) {
      if (error.status !== 404) this.error(error);
    } finally {
      this.fetching.delete(id);
    }
    for (const [name, data] of events) this.jobs.apply(name, data);
  }

  submitted(job) {
    this.table.addNew(this.jobs.put(job));
    toast(`Submitted ${job.type} job ${job.id}.`, { href: `#/jobs/${encodeURIComponent(job.id)}`, label: "Open" });
  }

  error(error) {
    if (error instanceof ApiError && error.status === 401) {
      return this.app.signOut("Your API key is no longer accepted. Sign in again.");
    }
    toast(error.message, { kind: "error" });
  }

  tick() {
    if (document.visibilityState !== "visible") return;
    this.table.tick();
    this.detail.tick();
  }
}

function showConnection(state) {
  const box = $("connection");
  box.dataset.state = state;
  box.querySelector(".connection-label").textContent = CONNECTION_LABELS[state] ?? state;
}

function toast(message, { kind = "info", href, label } = {}) {
  const item = h(
    "div",
    { class: `toast toast-${kind}` },
    h("span", {}, message),
    href ? h("a", { href, class: "toast-action" }, label) : null,
    h("button", { type: "button", class: "toast-close", "aria-label": "Dismiss", onclick: () => item.remove() }, "×"),
  );
  $("toasts").append(item);
  setTimeout(() => item.remove(), kind === "error" ? 10_000 : 5000);
}

new App().boot();
