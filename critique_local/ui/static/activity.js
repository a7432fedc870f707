"use strict";
// One row of a run's activity per stream event (builder.event and run.status), keyed by the
// event id: rows are never duplicated, whatever reconnects happened.
(function () {
  const UI = window.UI;
  const h = UI.h;

  function pretty(value) {
    if (value === undefined || value === null) return "";
    return typeof value === "string" ? value : JSON.stringify(value, null, 2);
  }

  function details(label, ...parts) {
    return h("details", {}, h("summary", {}, label), parts);
  }

  function block(name, value) {
    const text = pretty(value);
    return text ? h("div", { class: "io" }, h("div", { class: "io-name" }, name), h("pre", {}, text)) : null;
  }

  function builder(d) {
    switch (d.type) {
      case "tool": {
        const label = [h("span", { class: "tool-name" }, d.tool || "tool"), " ", UI.badge(d.status || "", "t-" + String(d.status).replace(/\W/g, "")),
          d.title ? h("span", { class: "muted" }, " " + d.title) : null];
        return details(label, block("input", d.input), block("output", d.output), block("error", d.error));
      }
      case "text":
        return h("div", { class: "assistant" }, h("span", { class: "who" }, "agent"), h("p", { class: "text" }, d.text || ""));
      case "file.edited":
        return h("div", {}, h("span", { class: "who" }, "edited"), h("code", { class: "path" }, d.path || ""));
      case "validation": {
        const label = [h("span", { class: "who" }, d.final ? "validation" : "check"), " ",
          UI.badge(d.status || (d.passed ? "passed" : "failed"), "v-" + String(d.status || "").replace(/\W/g, "")),
          d.command ? h("code", {}, " " + d.command) : null];
        return details(label, block("output", d.outputTail));
      }
      case "validation.repair":
        return h("div", {}, h("span", { class: "who" }, "repair"), `attempt ${d.attempt}`);
      case "publish":
        return details([h("span", { class: "who" }, "publish"), " ", d.status || d.outcome || ""], block("details", d));
      case "error":
        return h("div", { class: "err" }, h("span", { class: "who" }, "error"), h("code", {}, d.code || d.name || ""), " ",
          h("span", { class: "text" }, pretty(d.message || d.data || "")));
      case "warning":
        return details([h("span", { class: "who warn" }, "warning"), " ", h("code", {}, d.code || "")], block("details", d));
      default:
        return details([h("span", { class: "who" }, d.type || "event")], block("details", d));
    }
  }

  function status(d) {
    return h("div", { class: "status-row" }, h("span", { class: "who" }, "status"), UI.badge(d.status || ""),
      h("span", { class: "muted" }, " " + (d.lifecycle || "")),
      d.error ? h("span", { class: "err" }, ` ${d.error.code}: ${d.error.message}`) : null);
  }

  UI.activityRow = function (ev) {
    const d = ev.data || {};
    const body = ev.event === "run.status" ? status(d) : builder(d);
    return h("li", { class: "ev ev-" + (ev.event === "run.status" ? "status" : String(d.type || "other").replace(/\W/g, "-")),
      dataset: { id: String(ev.id) } }, h("span", { class: "ev-id" }, "#" + ev.id), body);
  };
})();
