// How times, durations and progress read in the dashboard.

/** Milliseconds since the epoch of an RFC 3339 time from the API (microseconds cut to ms). */
export function parseTime(value) {
  if (!value) return null;
  const ms = Date.parse(value.replace(/(\.\d{3})\d+/, "$1"));
  return Number.isNaN(ms) ? null : ms;
}

export function formatDuration(ms) {
  if (ms === null || ms === undefined || ms < 0) return "—";
  const seconds = ms / 1000;
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 60) return `${Math.floor(seconds)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${String(Math.floor(seconds % 60)).padStart(2, "0")} s`;
  const hours = Math.floor(minutes / 60);
  return `${hours} h ${String(minutes % 60).padStart(2, "0")} min`;
}

export function relativeTime(ms, now = Date.now()) {
  if (ms === null) return "—";
  const seconds = Math.round((now - ms) / 1000);
  if (seconds < 5) return "just now";
  if (seconds < 60) return `${seconds} s ago`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ago`;
  const hours = Math.floor(minutes / 60);
  if (hours < 24) return `${hours} h ago`;
  return dateTime(ms);
}

export function clockTime(ms) {
  if (ms === null) return "—";
  const d = new Date(ms);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

export function dateTime(ms) {
  if (ms === null) return "—";
  return new Date(ms).toLocaleString(undefined, {
    year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
}

/** How long the job ran, or has been running; null while it waits to start. */
export function jobDuration(job, now = Date.now()) {
  const started = parseTime(job.started_at);
  if (started === null) return null;
  const finished = parseTime(job.finished_at);
  return (finished ?? now) - started;
}

export function stepText(progress) {
  return [progress?.step, progress?.message].filter(Boolean).join(" · ");
}

/**
 * The worker's estimate of the time left, counted down since it arrived: "about 12 s left".
 * eta − updated_at is what the server estimated when it wrote the update (both on its clock), and
 * receivedAt is when this page got it (on ours): no clock skew between the two gets in.
 */
export function timeLeftText(job, now = Date.now()) {
  const eta = parseTime(job?.progress?.eta);
  const at = parseTime(job?.updated_at);
  if (eta === null || at === null || job.status !== "processing" || job.receivedAt === undefined) return "";
  const seconds = (eta - at - (now - job.receivedAt)) / 1000;
  if (seconds < 1) return "finishing";
  if (seconds < 60) return `about ${Math.round(seconds)} s left`;
  if (seconds < 3600) return `about ${Math.round(seconds / 60)} min left`;
  return `about ${(seconds / 3600).toFixed(1)} h left`;
}

export function percentText(progress) {
  return `${Math.round(Number(progress?.percent) || 0)}%`;
}

export const TERMINAL = new Set(["completed", "failed", "cancelled"]);
