"use strict";
// The API client: the key lives in this tab's session storage and travels only in the
// Authorization header (never in a URL, a cookie or a log), so a request from another site
// can never carry it: state changes are CSRF-safe by construction.
(function () {
  const UI = window.UI;
  const STORE = "critique-local.apiKey";
  const BASE = "/api/v1/coding-agent";

  UI.key = () => sessionStorage.getItem(STORE);
  UI.setKey = (k) => sessionStorage.setItem(STORE, k);
  UI.forgetKey = () => sessionStorage.removeItem(STORE);

  class ApiError extends Error {
    constructor(status, code, message, field) {
      super(message);
      this.status = status;
      this.code = code;
      this.field = field || null;
    }
  }
  UI.ApiError = ApiError;

  async function errorOf(resp) {
    let body = {};
    try { body = (await resp.json()).error || {}; } catch (_) { /* not JSON */ }
    return new ApiError(resp.status, body.code || "http_" + resp.status, body.message || resp.statusText, body.field);
  }

  function headers(extra) {
    return Object.assign({ Authorization: "Bearer " + (UI.key() || "") }, extra || {});
  }

  // JSON in, JSON out. Throws ApiError with the API's code, message and field.
  UI.api = async function (method, path, body) {
    const init = { method, headers: headers(), cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(BASE + path, init);
    if (!resp.ok) throw await errorOf(resp);
    return resp.json();
  };

  // The exact bytes of a response (the patch), or null on 404.
  UI.bytes = async function (path) {
    const resp = await fetch(BASE + path, { headers: headers(), cache: "no-store", credentials: "omit" });
    if (resp.status === 404) return null;
    if (!resp.ok) throw await errorOf(resp);
    return resp.arrayBuffer();
  };

  // Server-Sent Events over fetch (EventSource cannot send an Authorization header). Calls
  // onEvents with each chunk's complete events ({id, event, data}); resolves when the server
  // ends the stream, rejects on a network error or an error answer. Resumes after lastId.
  UI.stream = async function (runId, lastId, onEvents, signal) {
    const resp = await fetch(`${BASE}/runs/${encodeURIComponent(runId)}/stream`, {
      headers: headers(lastId ? { "Last-Event-ID": String(lastId) } : {}),
      cache: "no-store", credentials: "omit", signal,
    });
    if (!resp.ok) throw await errorOf(resp);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let ev = { id: null, event: "message", data: [] };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      // a chunk may end between the \r and \n of one line break: keep the \r for the next
      const hold = buffer.endsWith("\r") ? "\r" : "";
      const lines = (hold ? buffer.slice(0, -1) : buffer).split(/\r\n|\r|\n/);
      buffer = lines.pop() + hold;
      const out = [];
      for (const line of lines) {
        if (line === "") {
          if (ev.data.length) {
            let data = null;
            try { data = JSON.parse(ev.data.join("\n")); } catch (_) { data = { unparsed: ev.data.join("\n") }; }
            out.push({ id: ev.id === null ? null : Number(ev.id), event: ev.event, data });
          }
          ev = { id: null, event: "message", data: [] };
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "data") ev.data.push(val);
        else if (field === "id") ev.id = val;
        else if (field === "event") ev.event = val;
      }
      if (out.length) onEvents(out);
    }
  };
})();
