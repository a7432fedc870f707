"use strict";
// DOM from data. Every string a run, an agent or a repository supplies goes through
// document.createTextNode / textContent: nothing is ever parsed as HTML (no innerHTML here).
(function () {
  const UI = (window.UI = {});

  function appendAll(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  // Only same-page, same-origin or http(s) links: a javascript: or data: URL from a run is dropped.
  function safeHref(value) {
    const s = String(value);
    if (s.startsWith("#")) return s;
    if (s.startsWith("/") && !s.startsWith("//")) return s;
    try {
      const u = new URL(s);
      return u.protocol === "https:" || u.protocol === "http:" ? u.href : "#";
    } catch (_) {
      return "#";
    }
  }

  UI.h = function (tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "dataset") Object.assign(el.dataset, v);
      else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
      else if (k === "href") el.setAttribute("href", safeHref(v));
      else if (k === "value") el.value = v;
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    return appendAll(el, children);
  };
  UI.append = (el, ...children) => appendAll(el, children);
  UI.clear = (el) => { el.replaceChildren(); return el; };
  UI.fill = (el, ...children) => { el.replaceChildren(); return appendAll(el, children); };
  UI.safeHref = safeHref;
  UI.$ = (sel, root) => (root || document).querySelector(sel);

  UI.age = function (iso) {
    if (!iso) return "";
    const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 60) return Math.floor(s) + "s ago";
    if (s < 3600) return Math.floor(s / 60) + "m ago";
    if (s < 86400) return Math.floor(s / 3600) + "h ago";
    return Math.floor(s / 86400) + "d ago";
  };
  UI.usage = function (u) {
    if (!u) return "";
    const tokens = (u.inputTokens || 0) + (u.outputTokens || 0);
    return `${(u.credits || 0).toFixed(4)} credits · ${tokens} tokens · ${u.modelCalls || 0} calls`;
  };
  UI.stats = function (d) {
    return d ? `${d.filesChanged} files +${d.additions} −${d.deletions}` : "";
  };
  UI.sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  UI.badge = (text, kind) => UI.h("span", { class: "badge " + (kind || "b-" + String(text).replace(/[^a-z_]/g, "")) }, text);
})();
