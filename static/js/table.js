// The jobs table: newest first, filtered by status, type and a search over type and params,
// paginated with next_cursor (across live and archived jobs: the server merges them), and updated
// in place as events arrive (rows are kept by job id, never rebuilt for an update).

import { h, progressBar, replaceChildren, setProgress, statusBadge } from "./dom.js";
import {
  dateTime, formatDuration, jobDuration, parseTime, percentText, relativeTime, stepText, timeLeftText,
} from "./format.js";

const PAGE_SIZE = 25;
const SEARCH_MIN = 3; // the server's minimum for ?q=
const SEARCH_DELAY_MS = 300;

export class JobTable {
  constructor({ api, jobs, body, empty, loadMore, statusFilter, typeFilter, searchFilter, onError, signal }) {
    Object.assign(this, { api, jobs, body, empty, loadMore, statusFilter, typeFilter, searchFilter, onError });
    this.order = [];
    this.rows = new Map();
    this.nextCursor = null;
    this.loading = false;
    this.generation = 0;
    statusFilter.addEventListener("change", () => this.reload(), { signal });
    typeFilter.addEventListener("change", () => this.reload(), { signal });
    let searchTimer = null;
    let searched = "";
    searchFilter.addEventListener(
      "input",
      () => {
        clearTimeout(searchTimer);
        searchTimer = setTimeout(() => {
          if (this.filters.q === searched) return; // e.g. a 1-2 character search: not sent
          searched = this.filters.q;
          this.reload();
        }, SEARCH_DELAY_MS);
      },
      { signal },
    );
    loadMore.addEventListener("click", () => this.more(), { signal });
    jobs.subscribe((job) => this.update(job));
  }

  setTypes(types) {
    const current = this.typeFilter.value;
    replaceChildren(
      this.typeFilter,
      h("option", { value: "" }, "All types"),
      types.map((t) => h("option", { value: t.name }, t.name)),
    );
    this.typeFilter.value = types.some((t) => t.name === current) ? current : "";
  }

  get filters() {
    const text = this.searchFilter.value.trim();
    return {
      status: this.statusFilter.value,
      type: this.typeFilter.value,
      q: text.length >= SEARCH_MIN ? text : "",
    };
  }

  matches(job) {
    const { status, type, q } = this.filters;
    // The same text the server searches: the type, a space, the params as compact JSON.
    const text = `${job.type} ${JSON.stringify(job.params ?? {})}`.toLowerCase();
    return (!status || job.status === status) && (!type || job.type === type) && (!q || text.includes(q.toLowerCase()));
  }

  /** Load the first page again (filters changed, or events may have been missed). */
  async reload() {
    const generation = ++this.generation;
    this.loading = true;
    this.body.setAttribute("aria-busy", "true");
    try {
      const page = await this.api.listJobs({ ...this.filters, limit: PAGE_SIZE });
      if (generation !== this.generation) return;
      this.order = page.items.map((item) => this.jobs.put(item).id);
      this.nextCursor = page.next_cursor;
      this.renderAll();
    } catch (error) {
      if (generation === this.generation) this.onError(error);
    } finally {
      if (generation === this.generation) {
        this.loading = false;
        this.body.removeAttribute("aria-busy");
      }
    }
  }

  async more() {
    if (!this.nextCursor) return;
    const generation = this.generation;
    this.loadMore.disabled = true;
    try {
      const page = await this.api.listJobs({ ...this.filters, cursor: this.nextCursor, limit: PAGE_SIZE });
      if (generation !== this.generation) return;
      for (const item of page.items) {
        const job = this.jobs.put(item);
        if (this.order.includes(job.id)) continue;
        this.order.push(job.id);
        this.body.append(this.row(job));
      }
      this.nextCursor = page.next_cursor;
      this.renderFooter();
    } catch (error) {
      this.onError(error);
    } finally {
      this.loadMore.disabled = false;
    }
  }

  /** A job that did not exist when the list was loaded: it is the newest, so it goes on top. */
  addNew(job) {
    if (this.order.includes(job.id) || !this.matches(job)) return;
    this.order.unshift(job.id);
    this.body.prepend(this.row(job));
    this.renderFooter();
  }

  renderAll() {
    this.rows.clear();
    replaceChildren(this.body, this.order.map((id) => this.row(this.jobs.get(id))));
    this.renderFooter();
  }

  renderFooter() {
    this.empty.hidden = this.order.length > 0;
    const { status, type } = this.filters;
    this.empty.textContent = status || type ? "No jobs match these filters." : "No jobs yet. Submit one with the form.";
    this.loadMore.hidden = !this.nextCursor;
  }

  row(job) {
    const label = `Progress of ${job.type} job ${job.id}`;
    const cells = {
      badge: h("span"),
      bar: progressBar(label),
      percent: h("span", { class: "percent" }),
      step: h("span", { class: "step" }),
      left: h("span", { class: "time-left" }),
      created: h("time", { datetime: job.created_at, title: dateTime(parseTime(job.created_at)) }),
      duration: h("span"),
    };
    const link = h(
      "a",
      { href: `#/jobs/${encodeURIComponent(job.id)}`, class: "job-link" },
      h("span", { class: "job-type" }, job.type),
      h("span", { class: "job-id" }, job.id),
    );
    const tr = h(
      "tr",
      { dataset: { jobId: job.id } },
      h("td", { class: "col-job" }, link),
      h("td", { class: "col-status" }, cells.badge),
      h(
        "td",
        { class: "col-progress" },
        cells.bar,
        h("span", { class: "progress-meta" }, cells.percent, cells.step, cells.left),
      ),
      h("td", { class: "col-created" }, cells.created),
      h("td", { class: "col-duration" }, cells.duration),
    );
    // The whole row opens the job for a mouse; keyboards use the link (one tab stop per row).
    tr.addEventListener("click", (event) => {
      if (event.target.closest("a, button")) return;
      link.click();
    });
    this.rows.set(job.id, { tr, cells, status: null });
    this.fill(job);
    return tr;
  }

  update(job) {
    if (this.rows.has(job.id)) this.fill(job);
  }

  fill(job) {
    const entry = this.rows.get(job.id);
    if (!entry) return;
    const { tr, cells } = entry;
    if (entry.status !== job.status) {
      entry.status = job.status;
      tr.dataset.status = job.status;
      cells.badge.replaceWith((cells.badge = statusBadge(job.status)));
    }
    setProgress(cells.bar, job.progress?.percent, job.status);
    cells.percent.textContent = percentText(job.progress);
    const step = stepText(job.progress);
    cells.step.textContent = step;
    cells.step.title = step;
    this.tickRow(job, cells);
  }

  tickRow(job, cells, now = Date.now()) {
    cells.created.textContent = relativeTime(parseTime(job.created_at), now);
    cells.duration.textContent = formatDuration(jobDuration(job, now));
    cells.left.textContent = timeLeftText(job, now);
  }

  /** Durations of running jobs and "2 min ago" times move on by themselves. */
  tick() {
    const now = Date.now();
    for (const [id, { cells }] of this.rows) this.tickRow(this.jobs.get(id), cells, now);
  }
}
