// The live header: the tenant's jobs by status, the workers alive and the queue depth, as the
// feed's overview events say them (no request of its own, no timer). Until the first one arrives,
// and while the feed is down, the figures are dimmed: they may be out of date.

import { replaceChildren } from "./dom.js";

const STATUSES = ["queued", "processing", "completed", "failed", "cancelled"];
const number = new Intl.NumberFormat();

export class OverviewBar {
  constructor(container) {
    this.container = container;
    this.values = new Map();
    for (const el of container.querySelectorAll("[data-figure]")) this.values.set(el.dataset.figure, el);
  }

  show(data) {
    for (const status of STATUSES) this.set(status, data.counts?.[status]);
    this.set("workers", data.workers);
    this.set("queue", data.queue_depth);
    const noWorkers = data.workers === 0;
    this.container.querySelector('[data-item="workers"]')?.classList.toggle("overview-warn", noWorkers);
    this.container.dataset.fresh = "true";
  }

  set(name, value) {
    const el = this.values.get(name);
    if (el) replaceChildren(el, Number.isFinite(value) ? number.format(value) : "—");
  }

  /** The feed is down: the figures stay, marked as possibly stale. */
  stale() {
    this.container.dataset.fresh = "false";
  }

  clear() {
    for (const el of this.values.values()) replaceChildren(el, "—");
    this.container.dataset.fresh = "false";
  }
}
