// One job in full: progress, facts, the timeline of its transitions, its error or result (CSV
// download for types that have one), its webhook deliveries, and a cancel button.
//
// Live like the table: the feed updates the job in `jobs` and this view redraws its parts. The
// parts holding focusable controls (cancel, download) are kept, not rebuilt, so keyboard focus
// survives an update.

import { ApiError } from "./api.js";
import { h, progressBar, replaceChildren, setProgress, statusBadge } from "./dom.js";
import {
  clockTime, dateTime, formatDuration, jobDuration, parseTime, percentText, stepText, TERMINAL, timeLeftText,
} from "./format.js";

export class DetailView {
  constructor({ api, jobs, container, toast, onError }) {
    Object.assign(this, { api, jobs, container, toast, onError });
    this.id = null;
    this.jobTypes = [];
    jobs.subscribe((job, eventName) => {
      if (job.id !== this.id) return;
      this.update(job);
      // Terminal events may carry only a link to a large result; the resource has it all.
      if (eventName && TERMINAL.has(job.status)) this.refresh();
    });
  }

  async show(id) {
    this.id = id;
    this.outcomeKey = null;
    this.cancelling = this.cancelRequested = false;
    this.build(id);
    const known = this.jobs.get(id);
    if (known) this.update(known);
    await this.refresh();
    this.loadDeliveries();
  }

  hide() {
    this.id = null;
  }

  async refresh() {
    const id = this.id;
    try {
      const job = await this.api.getJob(id);
      if (id === this.id) this.jobs.put(job);
    } catch (error) {
      if (id !== this.id) return;
      if (error.status === 404) {
        replaceChildren(
          this.container,
          this.backLink(),
          h("div", { class: "card empty-card" }, h("h1", { id: "detail-heading" }, "Job not found"),
            h("p", { class: "muted" }, `There is no job ${id} for this API key. It may have expired after its retention period.`)),
        );
      } else {
        this.onError(error);
      }
    }
  }

  backLink() {
    return h("div", { class: "detail-top" }, h("a", { href: "#/", class: "back-link" }, "← All jobs"));
  }

  build(id) {
    this.parts = {
      title: h("span", { class: "job-type" }, "…"),
      badge: h("span"),
      cancel: h("button", { type: "button", class: "button danger", hidden: true }, "Cancel job"),
      bar: progressBar(`Progress of job ${id}`, "large"),
      percent: h("span", { class: "detail-percent" }),
      step: h("span", { class: "detail-step" }),
      left: h("span", { class: "time-left" }),
      facts: h("dl", { class: "facts" }),
      timeline: h("ol", { class: "timeline" }),
      outcome: h("section", { class: "card outcome", "aria-labelledby": "outcome-heading" }),
      params: h("pre", { class: "code" }),
      deliveries: h("div", { class: "deliveries" }, h("p", { class: "muted" }, "Loading…")),
    };
    const p = this.parts;
    p.cancel.addEventListener("click", () => this.cancel());
    replaceChildren(
      this.container,
      this.backLink(),
      h(
        "div",
        { class: "card detail-header" },
        h(
          "div",
          { class: "detail-title" },
          h("h1", { id: "detail-heading" }, p.title, h("span", { class: "visually-hidden" }, " job")),
          h("code", { class: "job-id" }, id),
        ),
        h("div", { class: "detail-actions" }, p.badge, p.cancel),
      ),
      h(
        "div",
        { class: "detail-grid" },
        h(
          "section",
          { class: "card", "aria-labelledby": "progress-heading" },
          h("h2", { id: "progress-heading" }, "Progress"),
          h("div", { class: "detail-progress" }, p.bar, h("div", { class: "detail-progress-meta" }, p.percent, p.step, p.left)),
          p.facts,
        ),
        h(
          "section",
          { class: "card", "aria-labelledby": "timeline-heading" },
          h("h2", { id: "timeline-heading" }, "Timeline"),
          p.timeline,
        ),
        p.outcome,
        h(
          "section",
          { class: "card", "aria-labelledby": "params-heading" },
          h("h2", { id: "params-heading" }, "Parameters"),
          p.params,
        ),
        h(
          "section",
          { class: "card deliveries-card", "aria-labelledby": "deliveries-heading" },
          h("h2", { id: "deliveries-heading" }, "Webhook deliveries"),
          p.deliveries,
        ),
      ),
    );
  }

  update(job) {
    const p = this.parts;
    p.title.textContent = job.type;
    document.title = `${job.type} ${job.id} · Jobcast`;
    if (p.badge.dataset.status !== job.status) p.badge.replaceWith((p.badge = statusBadge(job.status)));
    const terminal = TERMINAL.has(job.status);
    const requested = job.cancel_requested || this.cancelRequested;
    p.cancel.hidden = terminal;
    if (!this.cancelling) {
      p.cancel.disabled = requested;
      p.cancel.textContent = requested ? "Cancelling…" : "Cancel job";
    }
    setProgress(p.bar, job.progress?.percent, job.status);
    p.percent.textContent = percentText(job.progress);
    p.step.textContent = stepText(job.progress);
    p.left.textContent = timeLeftText(job);
    this.renderFacts(job);
    this.renderTimeline(job);
    this.renderOutcome(job);
    p.params.textContent = JSON.stringify(job.params ?? {}, null, 2);
  }

  tick() {
    const job = this.id && this.jobs.get(this.id);
    if (!job) return;
    this.parts.left.textContent = timeLeftText(job);
    if (!TERMINAL.has(job.status)) this.renderFacts(job);
  }

  renderFacts(job) {
    const fact = (term, value) => [h("dt", {}, term), h("dd", {}, value)];
    replaceChildren(
      this.parts.facts,
      fact("Attempt", `${job.attempt ?? 1} of ${job.max_attempts ?? "?"}`),
      fact("Priority", job.priority ?? "—"),
      fact("Created", dateTime(parseTime(job.created_at))),
      fact("Started", dateTime(parseTime(job.started_at))),
      fact("Finished", dateTime(parseTime(job.finished_at))),
      fact("Duration", formatDuration(jobDuration(job))),
    );
  }

  renderTimeline(job) {
    const history = job.history ?? [];
    const first = parseTime(history[0]?.at);
    replaceChildren(
      this.parts.timeline,
      history.map((entry, index) => {
        const at = parseTime(entry.at);
        const offset = index && first !== null ? `+${formatDuration(at - first)}` : "";
        return h(
          "li",
          { class: "timeline-item", dataset: { status: entry.status } },
          h("span", { class: "timeline-dot", "aria-hidden": "true" }),
          h(
            "div",
            { class: "timeline-body" },
            statusBadge(entry.status),
            h("span", { class: "timeline-attempt" }, `attempt ${entry.attempt}`),
            h("time", { datetime: entry.at, title: dateTime(at) }, clockTime(at)),
            offset ? h("span", { class: "timeline-offset" }, offset) : null,
          ),
        );
      }),
    );
  }

  renderOutcome(job) {
    // Rebuilt only when something it shows changes, so a focused download button stays put.
    const key = JSON.stringify([job.status, job.result, job.error]);
    if (key === this.outcomeKey) return;
    this.outcomeKey = key;
    const box = this.parts.outcome;
    if (job.status === "failed" || (job.error && !TERMINAL.has(job.status))) {
      const e = job.error ?? {};
      box.dataset.kind = "error";
      replaceChildren(
        box,
        h("h2", { id: "outcome-heading" }, job.status === "failed" ? "Error" : "Last error (will be retried)"),
        h("p", { class: "error-message" }, h("strong", {}, e.type ?? "Error"), ": ", e.message ?? "no message"),
        h(
          "dl",
          { class: "facts compact" },
          h("dt", {}, "Type"), h("dd", {}, h("code", {}, e.type ?? "—")),
          h("dt", {}, "Attempt"), h("dd", {}, String(e.attempt ?? "—")),
          h("dt", {}, "Retryable"), h("dd", {}, e.retryable ? "yes" : "no"),
        ),
      );
    } else if (job.status === "completed") {
      box.dataset.kind = "result";
      const type = this.jobTypes.find((t) => t.name === job.type);
      const csv = type?.result_formats?.includes("csv");
      replaceChildren(
        box,
        h(
          "div",
          { class: "card-header" },
          h("h2", { id: "outcome-heading" }, "Result"),
          csv ? h("button", { type: "button", class: "button secondary", onclick: () => this.downloadCsv(job) }, "Download CSV") : null,
        ),
        h("pre", { class: "code" }, JSON.stringify(job.result, null, 2)),
      );
    } else if (job.status === "cancelled") {
      box.dataset.kind = "cancelled";
      replaceChildren(box, h("h2", { id: "outcome-heading" }, "Result"), h("p", { class: "muted" }, "The job was cancelled; it has no result."));
    } else {
      box.dataset.kind = "pending";
      replaceChildren(box, h("h2", { id: "outcome-heading" }, "Result"), h("p", { class: "muted" }, "The result appears here when the job completes."));
    }
  }

  async downloadCsv(job) {
    try {
      const blob = await this.api.resultCsv(job.id);
      const url = URL.createObjectURL(blob);
      const link = h("a", { href: url, download: `${job.id}.csv`, hidden: true });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
    } catch (error) {
      this.onError(error);
    }
  }

  async cancel() {
    const id = this.id;
    const button = this.parts.cancel;
    button.disabled = true;
    button.textContent = "Cancelling…";
    this.cancelling = true;
    try {
      const { status, job } = await this.api.cancel(id);
      this.cancelling = false;
      this.cancelRequested = status === 202;
      this.jobs.put(job);
      this.toast(status === 202 ? "Cancellation requested: the job stops at its next step." : "Job cancelled.");
    } catch (error) {
      this.cancelling = false;
      button.disabled = false;
      button.textContent = "Cancel job";
      if (error instanceof ApiError && error.status === 409) {
        this.toast(`This job has already ended (${error.problem.job_status ?? "finished"}); it cannot be cancelled.`);
        this.refresh();
      } else {
        this.onError(error);
      }
    }
  }

  async loadDeliveries() {
    const id = this.id;
    const box = this.parts.deliveries;
    try {
      const body = await this.api.deliveries(id);
      if (id !== this.id) return;
      const items = body?.items ?? [];
      if (!items.length) {
        return replaceChildren(box, h("p", { class: "muted" }, "No webhook deliveries for this job."));
      }
      replaceChildren(
        box,
        h(
          "table",
          { class: "mini-table" },
          h("thead", {}, h("tr", {}, ["Event", "Status", "Attempts", "Response", "Last try"].map((t) => h("th", { scope: "col" }, t)))),
          h(
            "tbody",
            {},
            items.map((d) => {
              // GET /jobs/{id}/deliveries: each delivery with every attempt {at, duration_ms, status_code, error}.
              const attempts = d.attempts ?? [];
              const last = attempts.reduce((a, b) => (a && a.at > b.at ? a : b), null);
              const response = last ? (last.status_code ?? last.error ?? "—") : "—";
              return h(
                "tr",
                {},
                h("td", {}, d.event ?? "—"),
                h("td", {}, h("span", { class: `badge badge-delivery-${d.status ?? "unknown"}` }, d.status ?? "—")),
                h("td", {}, String(attempts.length)),
                h("td", {}, String(response)),
                h("td", {}, last ? dateTime(parseTime(last.at)) : "—"),
              );
            }),
          ),
        ),
      );
    } catch (error) {
      if (id !== this.id) return;
      const text =
        error.status === 404
          ? "Webhook deliveries are not available on this server yet."
          : `Could not load the deliveries: ${error.message}`;
      replaceChildren(box, h("p", { class: "muted" }, text));
    }
  }
}
