// The HTTP API of API.md, seen from the browser: every call sends the API key as a Bearer header.
// Errors come back as RFC 9457 problem details; ApiError carries them (status 0: no answer).

export class ApiError extends Error {
  constructor(status, problem = {}) {
    super(problem.detail || problem.title || (status ? `HTTP ${status}` : "The server could not be reached."));
    this.status = status;
    this.problem = problem;
    this.errors = Array.isArray(problem.errors) ? problem.errors : [];
  }
}

export class Api {
  constructor(apiKey) {
    this.apiKey = apiKey;
  }

  async request(method, path, { body, headers = {}, accept = "application/json", signal } = {}) {
    const init = { method, headers: { Authorization: `Bearer ${this.apiKey}`, Accept: accept, ...headers }, signal };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(0, { detail: "The server could not be reached. Check the connection and try again." });
    }
    if (!response.ok) {
      let problem = {};
      try {
        problem = await response.json();
      } catch {
        problem = { title: response.statusText };
      }
      throw new ApiError(response.status, problem);
    }
    return response;
  }

  async json(method, path, options) {
    const response = await this.request(method, path, options);
    return response.status === 204 ? null : response.json();
  }

  jobTypes() {
    return this.json("GET", "/job-types").then((body) => body.items);
  }

  listJobs({ status, type, q, cursor, limit = 25 } = {}) {
    const query = new URLSearchParams({ limit: String(limit) });
    if (status) query.set("status", status);
    if (type) query.set("type", type);
    if (q) query.set("q", q);
    if (cursor) query.set("cursor", cursor);
    return this.json("GET", `/jobs?${query}`);
  }

  getJob(id) {
    return this.json("GET", `/jobs/${encodeURIComponent(id)}`);
  }

  submit(body) {
    return this.json("POST", "/jobs", { body });
  }

  /** 200: cancelled now; 202: a running job was asked to stop. Both return the job. */
  async cancel(id) {
    const response = await this.request("POST", `/jobs/${encodeURIComponent(id)}/cancel`);
    return { status: response.status, job: await response.json() };
  }

  createToken() {
    return this.json("POST", "/tokens");
  }

  deliveries(id) {
    return this.json("GET", `/jobs/${encodeURIComponent(id)}/deliveries`);
  }

  async resultCsv(id) {
    const response = await this.request("GET", `/jobs/${encodeURIComponent(id)}/result`, { accept: "text/csv" });
    return response.blob();
  }
}
