// Building DOM nodes. Everything from the server (params, messages, results) goes in as text,
// never as HTML, so nothing a job reports can inject markup.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of [children].flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export function replaceChildren(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export function statusBadge(status) {
  return h("span", { class: `badge badge-${status}`, dataset: { status } }, status);
}

/** A progress bar that assistive technology reads as one (role, value, range, label). */
export function progressBar(label, size = "") {
  const fill = h("span", { class: "progress-fill" });
  const bar = h(
    "span",
    {
      class: `progress ${size}`.trim(),
      role: "progressbar",
      "aria-label": label,
      "aria-valuemin": "0",
      "aria-valuemax": "100",
      "aria-valuenow": "0",
    },
    fill,
  );
  return bar;
}

export function setProgress(bar, percent, status) {
  const value = Math.max(0, Math.min(100, Number(percent) || 0));
  const rounded = Math.round(value);
  if (bar.getAttribute("aria-valuenow") !== String(rounded)) {
    bar.setAttribute("aria-valuenow", String(rounded));
    bar.setAttribute("aria-valuetext", `${rounded}%`);
  }
  bar.firstElementChild.style.width = `${value}%`;
  bar.dataset.status = status;
}

/** Text with `backticked` words (as in job type descriptions) shown as code. */
export function withCode(text) {
  return String(text ?? "")
    .split(/`([^`]+)`/)
    .map((part, index) => (index % 2 ? h("code", {}, part) : part));
}
