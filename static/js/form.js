// The submission form, generated from the job types' params_schema (JSON Schema from pydantic).
//
// The server is the one judge of what is valid (the form is novalidate): its 422 answer lists
// each wrong field by location — ["body", "params", "seconds"] — and the message is shown under
// that field, which is marked aria-invalid and described by the message.

import { h, replaceChildren, withCode } from "./dom.js";

const PRIORITIES = ["high", "normal", "low"];

/** The schema of one property: $ref resolved, Optional[X] (anyOf with null) read as X. */
function resolve(schema, root) {
  let prop = schema;
  if (prop.$ref) {
    const name = prop.$ref.split("/").pop();
    prop = { ...(root.$defs?.[name] ?? {}), ...prop };
  }
  if (Array.isArray(prop.anyOf)) {
    const options = prop.anyOf.filter((alt) => alt.type !== "null");
    if (options.length === 1) prop = { ...resolve(options[0], root), ...prop, anyOf: undefined, nullable: true };
  }
  if (Array.isArray(prop.allOf) && prop.allOf.length === 1) prop = { ...resolve(prop.allOf[0], root), ...prop };
  return prop;
}

function humanize(name) {
  const words = name.replace(/_/g, " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

/** The title pydantic makes up from a field name ("fail_times" → "Fail Times"): not worth showing. */
function autoTitle(name) {
  return name.replace(/_/g, " ").replace(/\b\w/g, (c) => c.toUpperCase());
}

function rangeHint(prop) {
  // A bound beyond what a JavaScript number holds exactly (2**63 - 1 for a Python int) says nothing.
  const safe = (v) => (typeof v === "number" && !Number.isSafeInteger(v) && Number.isInteger(v) ? undefined : v);
  prop = { ...prop, minimum: safe(prop.minimum), maximum: safe(prop.maximum) };
  const low = prop.minimum ?? (prop.exclusiveMinimum !== undefined ? `> ${prop.exclusiveMinimum}` : undefined);
  const high = prop.maximum ?? (prop.exclusiveMaximum !== undefined ? `< ${prop.exclusiveMaximum}` : undefined);
  const fmt = (v) => (typeof v === "number" ? v.toLocaleString("en-US") : v);
  if (low !== undefined && high !== undefined) return `${fmt(low)} to ${fmt(high)}`;
  if (low !== undefined) return typeof low === "number" ? `at least ${fmt(low)}` : low;
  if (high !== undefined) return typeof high === "number" ? `at most ${fmt(high)}` : high;
  return "";
}

export class SubmitForm {
  constructor({ form, api, onSubmitted, signal }) {
    Object.assign(this, { form, api, onSubmitted });
    this.types = [];
    this.fields = new Map(); // name → { kind, input, error, prop }
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    }, { signal });
  }

  setTypes(types) {
    this.types = types;
    this.typeSelect = h(
      "select",
      { id: "job-type", name: "type", "aria-describedby": "job-type-help job-type-error" },
      types.map((t) => h("option", { value: t.name }, t.name)),
    );
    this.typeHelp = h("p", { id: "job-type-help", class: "hint" });
    this.typeError = h("p", { id: "job-type-error", class: "field-error", hidden: true });
    this.paramsBox = h("div", { class: "params" });
    this.prioritySelect = h(
      "select",
      { id: "job-priority", name: "priority", "aria-describedby": "job-priority-error" },
      PRIORITIES.map((p) => h("option", { value: p }, p.charAt(0).toUpperCase() + p.slice(1))),
    );
    this.priorityError = h("p", { id: "job-priority-error", class: "field-error", hidden: true });
    this.webhookInput = h("input", {
      id: "job-webhook",
      name: "webhook",
      type: "url",
      inputmode: "url",
      placeholder: "https://example.com/hooks/jobcast",
      "aria-describedby": "job-webhook-help job-webhook-error",
    });
    this.webhookError = h("p", { id: "job-webhook-error", class: "field-error", hidden: true });
    this.formError = h("div", { class: "form-error", role: "alert", hidden: true });
    this.submitButton = h("button", { type: "submit", class: "button primary wide" }, "Submit job");

    replaceChildren(
      this.form,
      h("div", { class: "field" }, h("label", { for: "job-type" }, "Job type"), this.typeSelect, this.typeHelp, this.typeError),
      this.paramsBox,
      h(
        "div",
        { class: "field-row" },
        h("div", { class: "field" }, h("label", { for: "job-priority" }, "Priority"), this.prioritySelect, this.priorityError),
      ),
      h(
        "details",
        { class: "more-options" },
        h("summary", {}, "Webhook"),
        h(
          "div",
          { class: "field" },
          h("label", { for: "job-webhook" }, "Webhook URL ", h("span", { class: "optional" }, "(optional)")),
          this.webhookInput,
          h("p", { id: "job-webhook-help", class: "hint" }, "Called with a signed POST when the job ends."),
          this.webhookError,
        ),
      ),
      this.formError,
      this.submitButton,
    );
    this.typeSelect.addEventListener("change", () => this.renderParams());
    for (const [select, error] of [[this.prioritySelect, this.priorityError], [this.webhookInput, this.webhookError]]) {
      select.addEventListener("input", () => this.clearError(select, error));
    }
    this.renderParams();
  }

  get type() {
    return this.types.find((t) => t.name === this.typeSelect.value);
  }

  renderParams() {
    const type = this.type;
    this.clearErrors();
    this.fields.clear();
    if (!type) return replaceChildren(this.paramsBox);
    replaceChildren(this.typeHelp, withCode(type.description));
    this.prioritySelect.value = type.priority ?? "normal";
    const schema = type.params_schema ?? {};
    const required = new Set(schema.required ?? []);
    const nodes = Object.entries(schema.properties ?? {}).map(([name, raw]) =>
      this.field(name, resolve(raw, schema), required.has(name)),
    );
    replaceChildren(
      this.paramsBox,
      nodes.length
        ? h("fieldset", { class: "params-fieldset" }, h("legend", {}, "Parameters"), nodes)
        : h("p", { class: "hint" }, "This job type takes no parameters."),
    );
  }

  field(name, prop, required) {
    const id = `param-${name}`;
    const errorId = `${id}-error`;
    const hintId = `${id}-hint`;
    const hint = [prop.description, rangeHint(prop)].filter(Boolean).join(" · ");
    const describedBy = [hint ? hintId : null, errorId].filter(Boolean).join(" ");
    const error = h("p", { id: errorId, class: "field-error", hidden: true });
    const label = h(
      "label",
      { for: id },
      prop.title && prop.title !== autoTitle(name) ? prop.title : humanize(name),
      required ? h("span", { class: "required", "aria-hidden": "true" }, " *") : null,
    );
    let kind;
    let input;
    if (prop.type === "boolean") {
      kind = "boolean";
      input = h("input", { id, name, type: "checkbox", "aria-describedby": describedBy, checked: prop.default === true });
      const wrapper = h(
        "div",
        { class: "field checkbox-field" },
        h("div", { class: "checkbox-line" }, input, label),
        hint ? h("p", { id: hintId, class: "hint" }, withCode(hint)) : null,
        error,
      );
      this.register(name, { kind, input, error, prop });
      return wrapper;
    }
    if (Array.isArray(prop.enum)) {
      kind = "enum";
      input = h(
        "select",
        { id, name, "aria-describedby": describedBy, required },
        required && prop.default === undefined ? h("option", { value: "" }, "Choose…") : null,
        prop.enum.map((v) => h("option", { value: JSON.stringify(v), selected: v === prop.default }, String(v))),
      );
    } else if (prop.type === "number" || prop.type === "integer") {
      kind = prop.type;
      input = h("input", {
        id,
        name,
        type: "number",
        inputmode: prop.type === "integer" ? "numeric" : "decimal",
        step: prop.type === "integer" ? "1" : "any",
        min: prop.minimum,
        max: prop.maximum,
        value: prop.default,
        required,
        "aria-describedby": describedBy,
      });
    } else if (prop.type === "string") {
      kind = "string";
      input = h("input", {
        id,
        name,
        type: prop.format === "uri" ? "url" : "text",
        value: prop.default,
        minlength: prop.minLength,
        maxlength: prop.maxLength,
        pattern: prop.pattern,
        required,
        "aria-describedby": describedBy,
      });
    } else {
      kind = "json"; // objects, arrays, unions: typed as JSON
      input = h("textarea", { id, name, rows: 3, class: "mono", required, "aria-describedby": describedBy });
      if (prop.default !== undefined) input.value = JSON.stringify(prop.default);
    }
    this.register(name, { kind, input, error, prop });
    const hintBox = hint ? h("p", { id: hintId, class: "hint" }, withCode(hint)) : null;
    return h("div", { class: "field" }, label, input, hintBox, error);
  }

  register(name, field) {
    this.fields.set(name, field);
    field.input.addEventListener("input", () => this.clearError(field.input, field.error));
  }

  /** The params object: empty optional inputs are left out, so the server applies its defaults. */
  params() {
    const params = {};
    for (const [name, { kind, input }] of this.fields) {
      if (kind === "boolean") {
        params[name] = input.checked;
        continue;
      }
      const raw = input.value.trim();
      if (raw === "") continue;
      if (kind === "number" || kind === "integer") {
        const value = Number(raw);
        params[name] = Number.isFinite(value) ? value : raw; // let the server say what is wrong
      } else if (kind === "enum" || kind === "json") {
        try {
          params[name] = JSON.parse(raw);
        } catch {
          params[name] = raw;
        }
      } else {
        params[name] = raw;
      }
    }
    return params;
  }

  async submit() {
    const type = this.type;
    if (!type) return;
    this.clearErrors();
    const body = { type: type.name, params: this.params(), priority: this.prioritySelect.value };
    const webhook = this.webhookInput.value.trim();
    if (webhook) body.webhook = { url: webhook };
    this.submitButton.disabled = true;
    this.submitButton.textContent = "Submitting…";
    try {
      const job = await this.api.submit(body);
      this.onSubmitted(job);
    } catch (error) {
      this.showErrors(error);
    } finally {
      this.submitButton.disabled = false;
      this.submitButton.textContent = "Submit job";
    }
  }

  showErrors(error) {
    const unplaced = [];
    let first = null;
    for (const item of error.errors) {
      const loc = item.loc ?? [];
      const target = this.target(loc);
      if (!target) {
        unplaced.push(`${loc.slice(1).join(".") || "request"}: ${item.msg}`);
        continue;
      }
      const [input, box] = target;
      input.setAttribute("aria-invalid", "true");
      box.hidden = false;
      box.textContent = box.textContent ? `${box.textContent} ${item.msg}` : item.msg;
      first ??= input;
    }
    if (!error.errors.length) unplaced.push(error.message);
    if (unplaced.length) {
      replaceChildren(
        this.formError,
        h("strong", {}, error.status === 422 ? "The job was not accepted. " : "Could not submit the job. "),
        unplaced.join("; "),
      );
      this.formError.hidden = false;
    } else if (first) {
      this.formError.hidden = false;
      replaceChildren(this.formError, "Fix the highlighted field and submit again.");
    }
    if (first) first.focus();
  }

  /** The input and message box for an error location, or null. */
  target(loc) {
    if (loc[0] !== "body") return null;
    if (loc[1] === "params" && loc.length > 2) {
      const field = this.fields.get(String(loc[2]));
      return field ? [field.input, field.error] : null;
    }
    if (loc[1] === "type") return [this.typeSelect, this.typeError];
    if (loc[1] === "priority") return [this.prioritySelect, this.priorityError];
    if (loc[1] === "webhook") {
      this.form.querySelector("details.more-options").open = true;
      return [this.webhookInput, this.webhookError];
    }
    return null;
  }

  clearError(input, box) {
    input.removeAttribute("aria-invalid");
    box.hidden = true;
    box.textContent = "";
  }

  clearErrors() {
    for (const { input, error } of this.fields.values()) this.clearError(input, error);
    if (this.typeSelect) {
      this.clearError(this.typeSelect, this.typeError);
      this.clearError(this.prioritySelect, this.priorityError);
      this.clearError(this.webhookInput, this.webhookError);
    }
    if (this.formError) this.formError.hidden = true;
  }
}
