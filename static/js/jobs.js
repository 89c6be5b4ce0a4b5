// The jobs the page knows, by id: merged from API answers and from the event feed.
//
// Both sources say when they were true (a resource's updated_at, an event's at), so whichever
// arrives late cannot roll a job back: a list loaded while events stream in, or an event
// replayed after a reconnect, leaves each job at its newest known state. receivedAt is when the
// page learnt the job's current state, on the page's clock (for counting down its time left).

import { TERMINAL } from "./format.js";

const LIVE_FIELDS = [
  "status", "progress", "attempt", "updated_at", "started_at", "finished_at", "history", "result", "error",
];

export class Jobs {
  constructor() {
    this.byId = new Map();
    this.listeners = new Set();
  }

  get(id) {
    return this.byId.get(id) ?? null;
  }

  clear() {
    this.byId.clear();
  }

  /** listener(job, eventName): eventName is null for a resource read from the API. */
  subscribe(listener) {
    this.listeners.add(listener);
  }

  emit(job, eventName) {
    for (const listener of this.listeners) listener(job, eventName);
  }

  /** A job resource from the API. */
  put(resource) {
    const known = this.byId.get(resource.id);
    const job = { ...known, ...resource };
    if (known && known.updated_at > resource.updated_at) {
      for (const field of [...LIVE_FIELDS, "receivedAt"]) job[field] = known[field];
    } else {
      job.receivedAt = Date.now();
    }
    this.byId.set(job.id, job);
    this.emit(job, null);
    return job;
  }

  /** An event from the feed; returns the job, or null when the page does not know it. */
  apply(name, data) {
    const known = this.byId.get(data.job_id);
    if (!known) return null;
    if (known.updated_at && data.at < known.updated_at) return known; // already reflected
    const job = {
      ...known,
      status: data.status,
      attempt: data.attempt,
      progress: data.progress ?? known.progress,
      updated_at: data.at,
      receivedAt: Date.now(),
    };
    if (name !== "job.progress") {
      const history = known.history ?? [];
      const seen = history.some((entry) => entry.status === data.status && entry.at === data.at);
      if (!seen) job.history = [...history, { status: data.status, at: data.at, attempt: data.attempt }];
    }
    if (name === "job.processing") job.started_at = data.at;
    if (name === "job.retrying" && data.error) job.error = data.error;
    if (TERMINAL.has(data.status)) {
      job.finished_at = data.at;
      if ("result" in data) job.result = data.result;
      if ("error" in data) job.error = data.error;
    }
    this.byId.set(job.id, job);
    this.emit(job, name);
    return job;
  }
}
