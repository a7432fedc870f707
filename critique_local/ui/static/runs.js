"use strict";
// The runs list (filters, cursor paging, live rows) and the new-run form.
(function () {
  const UI = window.UI;
  const h = UI.h;
  const STATUSES = ["", "queued", "running", "idle", "completed", "failed", "cancelled"];
  const LIVE_MS = 3000;

  // API errors next to the field they name (the longest data-field that prefixes it), else on top.
  UI.showErrors = function (form, err) {
    for (const el of form.querySelectorAll(".field-error")) el.textContent = "";
    const general = form.querySelector(".form-error");
    general.textContent = "";
    if (!err) return;
    const field = err.field || "";
    let best = null;
    for (const el of form.querySelectorAll("[data-field]")) {
      const name = el.dataset.field;
      if ((field === name || field.startsWith(name + ".")) && (!best || name.length > best.dataset.field.length)) best = el;
    }
    const text = `${err.message} (${err.code})`;
    if (best) best.querySelector(".field-error").textContent = text;
    else general.textContent = text;
  };

  function forbidden(err) {
    return h("div", { class: "notice err", id: "forbidden" },
      h("p", {}, "This key cannot see runs: ", err.message, "."),
      h("p", {}, "The runs list and pages need a key with the read:builder scope. Create one with ",
        h("code", {}, "critique-local keys create --user NAME --scopes read:builder,write:builder"),
        " and sign in with it."));
  }
  UI.forbidden = forbidden;

  function row(r) {
    return h("tr", { dataset: { run: r.id, status: r.status } },
      h("td", {}, UI.badge(r.status), h("div", { class: "muted small" }, r.lifecycle)),
      h("td", {}, h("a", { href: "#/runs/" + encodeURIComponent(r.id), class: "run-link" }, r.title || r.summary || r.id),
        h("div", { class: "muted small mono" }, r.id)),
      h("td", { class: "mono" }, r.repository ? r.repository.fullName : ""),
      h("td", { class: "mono small" }, r.modelId),
      h("td", {}, (r.tags || []).map((t) => h("span", { class: "tag" }, t))),
      h("td", { class: "num" }, String(r.turnCount)),
      h("td", { class: "small", title: r.createdAt }, UI.age(r.createdAt)),
      h("td", { class: "small" }, UI.usage(r.usage)));
  }

  UI.runsView = function (main, params) {
    const filters = { status: params.get("status") || "", tag: params.get("tag") || "", repository: params.get("repository") || "" };
    const cursors = [];  // the cursors of the pages before this one
    let cursor = params.get("cursor") || "";
    let timer = null;
    const tbody = h("tbody", { id: "runs-body" });
    const pager = h("div", { class: "pager" });
    const info = h("div", { class: "info" });
    const status = h("select", { name: "status", id: "filter-status" }, STATUSES.map((s) => h("option", { value: s }, s || "any status")));
    status.value = filters.status;
    const tag = h("input", { name: "tag", id: "filter-tag", placeholder: "tag", value: filters.tag });
    const repo = h("input", { name: "repository", id: "filter-repository", placeholder: "owner/name", value: filters.repository });
    const form = h("form", { class: "filters", id: "filters" }, status, tag, repo, h("button", { type: "submit" }, "Filter"));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const q = new URLSearchParams();
      for (const [k, el] of [["status", status], ["tag", tag], ["repository", repo]]) if (el.value.trim()) q.set(k, el.value.trim());
      location.hash = "#/runs" + (q.toString() ? "?" + q : "");
    });
    UI.fill(main, h("h2", {}, "Runs"), form, info,
      h("table", { class: "runs" }, h("thead", {}, h("tr", {}, ["Status", "Run", "Repository", "Model", "Tags", "Turns", "Age", "Usage"].map((c) => h("th", {}, c)))), tbody),
      pager);

    async function load() {
      clearTimeout(timer);
      const q = new URLSearchParams({ limit: "20" });
      for (const [k, v] of Object.entries(filters)) if (v) q.set(k, v);
      if (cursor) q.set("cursor", cursor);
      try {
        const page = await UI.api("GET", "/runs?" + q);
        if (!main.isConnected) return;
        UI.clear(info);
        tbody.replaceChildren(...page.data.map(row));
        if (!page.data.length) tbody.append(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No runs.")));
        UI.fill(pager, 
          cursors.length ? h("button", { type: "button", id: "newer", onclick: () => { cursor = cursors.pop() || ""; load(); } }, "← Newer") : null,
          page.nextCursor ? h("button", { type: "button", id: "older", onclick: () => { cursors.push(cursor); cursor = page.nextCursor; load(); } }, "Older →") : null);
      } catch (err) {
        if (!main.isConnected) return;
        UI.fill(info, err.status === 403 ? forbidden(err) : h("p", { class: "err" }, `${err.message} (${err.code || "network"})`));
        if (err.status === 401) return UI.signOut(err.message);
        if (err.status === 403) return;
      }
      if (main.isConnected) timer = setTimeout(load, LIVE_MS);  // rows update live
    }
    load();
    return () => clearTimeout(timer);
  };

  function field(name, label, control, hint) {
    return h("div", { class: "field", dataset: { field: name } }, h("label", {}, label, control),
      hint ? h("div", { class: "muted small" }, hint) : null, h("div", { class: "field-error", role: "alert" }));
  }

  UI.newRunView = function (main) {
    const model = h("select", { name: "modelId", id: "new-model" }, h("option", { value: "" }, "server default"));
    const repository = h("input", { name: "repository", id: "new-repository", placeholder: "owner/name", required: true });
    const prompt = h("textarea", { name: "prompt", id: "new-prompt", rows: 8, required: true });
    const title = h("input", { name: "title", id: "new-title" });
    const tags = h("input", { name: "tags", id: "new-tags", placeholder: "comma, separated" });
    const kind = h("select", { name: "taskKind", id: "new-kind" }, h("option", { value: "code" }, "code"), h("option", { value: "plan" }, "plan (read-only)"));
    const validation = h("select", { name: "validationMode", id: "new-validation" }, ["", "basic", "tests", "minimal"].map((v) => h("option", { value: v }, v || "server default")));
    const publish = h("select", { name: "publish", id: "new-publish" }, h("option", { value: "none" }, "none"), h("option", { value: "draft_pr" }, "draft pull request"));
    const network = h("select", { name: "network", id: "new-network" }, ["", "none", "restricted", "open"].map((v) => h("option", { value: v }, v || "server default")));
    const allowlist = h("input", { name: "allowlist", id: "new-allowlist", placeholder: "hosts for restricted, comma separated" });
    const submit = h("button", { type: "submit", id: "new-submit" }, "Start run");
    const form = h("form", { class: "new-run", id: "new-run" },
      h("div", { class: "form-error", role: "alert" }),
      field("repository", "Repository ", repository), field("prompt", "Prompt ", prompt),
      field("modelId", "Model ", model), field("taskKind", "Task kind ", kind),
      field("validationMode", "Validation ", validation), field("publish", "Publish ", publish),
      field("safety", "Network ", network), field("safety.network.allowlist", "Allowlist ", allowlist),
      field("title", "Title ", title), field("tags", "Tags ", tags), submit);
    UI.fill(main, h("h2", {}, "New run"), form);
    UI.api("GET", "/models").then((list) => {
      for (const m of list.data) model.append(h("option", { value: m.id }, `${m.name || m.id} (${m.id})`));
    }).catch((err) => UI.showErrors(form, err));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const body = { repository: repository.value.trim(), prompt: prompt.value, taskKind: kind.value };
      if (model.value) body.modelId = model.value;
      if (validation.value) body.validationMode = validation.value;
      if (publish.value !== "none") body.publish = { mode: publish.value };
      if (network.value) {
        body.safety = { network: { mode: network.value } };
        const hosts = allowlist.value.split(",").map((s) => s.trim()).filter(Boolean);
        if (hosts.length) body.safety.network.allowlist = hosts;
      }
      if (title.value.trim()) body.title = title.value.trim();
      const tagList = tags.value.split(",").map((s) => s.trim()).filter(Boolean);
      if (tagList.length) body.tags = tagList;
      submit.disabled = true;
      try {
        const created = await UI.api("POST", "/runs", body);
        location.hash = "#/runs/" + encodeURIComponent(created.run.id);
      } catch (err) {
        UI.showErrors(form, err);
        if (err.status === 401) UI.signOut(err.message);
      } finally {
        submit.disabled = false;
      }
    });
  };
})();
