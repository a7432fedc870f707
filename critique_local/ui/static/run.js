"use strict";
// One run: header and actions, the live activity (SSE, resumed with Last-Event-ID after the
// last row shown: no gap, no duplicate), the turns, the diff, validation and usage.
(function () {
  const UI = window.UI;
  const h = UI.h;
  const TERMINAL = new Set(["completed", "failed", "cancelled"]);
  const IDLE_POLL_MS = 3000;

  UI.runView = function (main, runId) {
    let run = null;
    let lastId = 0;
    let following = false;
    let diffMode = sessionStorage.getItem("critique-local.diffMode") || "unified";
    let patchText = null;
    let patchFor = null;
    const abort = new AbortController();
    let timer = null;

    const head = h("div", { class: "run-head", id: "run-head" });
    const actions = h("div", { class: "actions", id: "actions" });
    const feed = h("ol", { class: "activity", id: "activity" });
    const live = h("span", { class: "live muted", id: "live" });
    const turns = h("div", { id: "turns" });
    const diffBox = h("div", { id: "diff" });
    const validation = h("div", { id: "validation" });
    const notice = h("div", { id: "run-notice" });
    UI.fill(main, notice, head, actions,
      h("div", { class: "cols" },
        h("section", { class: "panel" }, h("h3", {}, "Activity ", live), feed),
        h("div", { class: "side" },
          h("section", { class: "panel" }, h("h3", {}, "Turns"), turns),
          h("section", { class: "panel" }, h("h3", {}, "Validation"), validation))),
      h("section", { class: "panel" }, h("h3", {}, "Changes"), diffBox));

    function onEvents(events) {
      const frag = document.createDocumentFragment();
      let statusSeen = false;
      for (const ev of events) {
        if (ev.id === null || ev.id <= lastId) continue;  // already shown
        lastId = ev.id;
        frag.append(UI.activityRow(ev));
        if (ev.event === "run.status") statusSeen = true;
      }
      feed.append(frag);
      if (statusSeen) refresh();
    }

    async function follow() {
      if (following) return;
      following = true;
      let backoff = 500;
      try {
        while (main.isConnected) {
          live.textContent = "● live";
          try {
            await UI.stream(runId, lastId, onEvents, abort.signal);
            backoff = 500;
          } catch (err) {
            if (abort.signal.aborted || !main.isConnected) return;
            if (err instanceof UI.ApiError && err.status < 500 && err.status !== 429) { showError(err); return; }
            live.textContent = "reconnecting…";
            await UI.sleep(backoff);
            backoff = Math.min(backoff * 2, 8000);
            continue;
          }
          await refresh();  // the server ends the stream when the turn is over
          if (!run || TERMINAL.has(run.status) || run.status === "idle") return;
        }
      } finally {
        following = false;
        live.textContent = "";
      }
    }

    function showError(err) {
      UI.fill(notice, err.status === 403 ? UI.forbidden(err) : h("p", { class: "notice err" }, `${err.message} (${err.code})`));
      if (err.status === 401) UI.signOut(err.message);
    }

    async function refresh() {
      try {
        const got = await UI.api("GET", "/runs/" + encodeURIComponent(runId));
        if (!main.isConnected) return;
        run = got.run;
        render();
      } catch (err) {
        if (main.isConnected) showError(err);
      }
    }

    function render() {
      UI.fill(head, 
        h("h2", {}, h("span", { id: "run-title" }, run.title || run.id)),
        h("div", { class: "meta" }, Object.assign(UI.badge(run.status), { id: "run-status" }), " ", h("span", { id: "run-lifecycle" }, run.lifecycle), " · ",
          h("span", { class: "mono" }, run.repository.fullName), " · ", h("span", { class: "mono" }, run.modelId),
          " · ", run.taskKind, " · ", h("span", { class: "mono small" }, run.id),
          run.baseCommit ? [" · base ", h("span", { class: "mono" }, run.baseCommit.slice(0, 12))] : null),
        run.summary ? h("p", { class: "summary", id: "run-summary" }, run.summary) : null,
        run.error ? h("p", { class: "err", id: "run-error" }, `${run.error.code}: ${run.error.message}`) : null,
        h("p", { class: "small" }, h("span", { id: "run-usage" }, "Usage: " + UI.usage(run.usage)),
          run.diffStats ? " · " + UI.stats(run.diffStats) : "",
          run.sessionActive && run.sessionExpiresAt ? ` · session until ${run.sessionExpiresAt}` : ""),
        run.draftPullRequest ? h("p", {}, "Draft pull request: ",
          h("a", { href: run.draftPullRequest.url, id: "pr-link", rel: "noopener noreferrer", target: "_blank" },
            `#${run.draftPullRequest.number} ${run.draftPullRequest.title}`)) : null,
        run.chainedToRunId ? h("p", {}, "Continued in ", h("a", { href: "#/runs/" + encodeURIComponent(run.chainedToRunId) }, run.chainedToRunId)) : null);
      renderActions();
      renderTurns();
      renderValidation();
      loadDiff();
      if (!following && !TERMINAL.has(run.status) && run.status !== "idle") follow();
      clearTimeout(timer);
      if (run.status === "idle") timer = setTimeout(refresh, IDLE_POLL_MS);  // a follow-up sent elsewhere, expiry
    }

    function renderActions() {
      const next = new Set(run.nextActions || []);
      const prompt = h("textarea", { id: "followup-prompt", rows: 3, placeholder: "Follow-up prompt" });
      const form = h("form", { id: "followup", class: "followup" }, h("div", { class: "form-error", role: "alert" }),
        h("div", { class: "field", dataset: { field: "prompt" } }, prompt, h("div", { class: "field-error", role: "alert" })),
        h("button", { type: "submit", id: "followup-send" }, "Send follow-up"));
      form.addEventListener("submit", async (e) => {
        e.preventDefault();
        const res = await act(form, "/messages", { prompt: prompt.value });
        if (res && res.run.id !== run.id) location.hash = "#/runs/" + encodeURIComponent(res.run.id);
      });
      const buttons = h("div", { class: "buttons" },
        next.has("end_session") ? h("button", { type: "button", id: "end-session", onclick: () => act(form, "/messages", { endSession: true }) }, "End session") : null,
        next.has("cancel") ? h("button", { type: "button", id: "cancel", class: "danger", onclick: () => { if (confirm("Cancel this run?")) act(form, "/cancel", undefined); } }, "Cancel") : null,
        run.diffStats ? h("button", { type: "button", id: "download", onclick: download }, "Download patch") : null);
      UI.fill(actions, run.canFollowUp || next.has("send_message") ? form : null, buttons);
    }

    async function act(form, path, body) {
      UI.showErrors(form, null);
      try {
        const res = await UI.api("POST", "/runs/" + encodeURIComponent(runId) + path, body === undefined ? {} : body);
        run = res.run.id === runId ? res.run : run;
        render();
        if (res.run.id === runId) follow();
        return res;
      } catch (err) {
        UI.showErrors(form, err);
        if (err.status === 401) UI.signOut(err.message);
        return null;
      }
    }

    async function download() {
      const bytes = await UI.bytes("/runs/" + encodeURIComponent(runId) + "/patch");
      if (!bytes) return;
      const url = URL.createObjectURL(new Blob([bytes], { type: "text/x-diff" }));
      const a = h("a", { href: "#", download: runId + ".patch" });
      a.href = url;  // a blob: URL we made, from the exact bytes
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    }

    function renderTurns() {
      UI.fill(turns, h("ol", { class: "turns" }, (run.turns || []).map((t) => h("li", { class: "turn", dataset: { index: String(t.index) } },
        h("div", {}, h("strong", {}, `Turn ${t.index}`), " ", UI.badge(t.status), " ", UI.stats(t.diffStats),
          t.validation ? [" · validation ", UI.badge(t.validation.status)] : null),
        t.prompt ? h("details", {}, h("summary", {}, "Prompt"), h("pre", { class: "prompt" }, t.prompt)) : null,
        t.summary ? h("p", { class: "summary" }, t.summary) : null,
        h("div", { class: "muted small" }, UI.usage(t.usage))))));
      if (!(run.turns || []).length) turns.append(h("p", { class: "muted" }, "No turn yet."));
    }

    function renderValidation() {
      const v = run.validation;
      UI.fill(validation, v
        ? [h("p", {}, UI.badge(v.status), " ", v.mode, v.command ? [" · ", h("code", {}, v.command)] : null,
            v.exitCode !== null && v.exitCode !== undefined ? ` · exit ${v.exitCode}` : "", ` · ${v.durationMs} ms`),
          v.outputTail ? h("pre", { class: "output", id: "validation-output" }, v.outputTail) : null]
        : h("p", { class: "muted" }, "No validation yet."));
    }

    async function loadDiff() {
      const key = `${run.turnCount}:${run.status}:${run.diffStats ? run.diffStats.additions + "/" + run.diffStats.deletions : "-"}`;
      if (patchFor === key) return;
      patchFor = key;
      if (!run.diffStats) { patchText = null; return drawDiff(); }
      try {
        const bytes = await UI.bytes("/runs/" + encodeURIComponent(runId) + "/patch");
        patchText = bytes ? new TextDecoder("utf-8", { fatal: false }).decode(bytes) : null;
      } catch (err) {
        patchText = null;
      }
      drawDiff();
    }

    function drawDiff() {
      if (patchText === null) { UI.fill(diffBox, h("p", { class: "muted" }, "No changes yet.")); return; }
      const toggle = h("div", { class: "toggle" }, ["unified", "split"].map((m) =>
        h("button", { type: "button", id: "diff-" + m, class: m === diffMode ? "on" : "", onclick: () => {
          diffMode = m; sessionStorage.setItem("critique-local.diffMode", m); drawDiff(); } }, m === "split" ? "side by side" : "unified")));
      UI.fill(diffBox, toggle, UI.renderDiff(UI.parsePatch(patchText), diffMode));
    }

    // the run and its events load side by side: the activity paints as soon as the stream answers
    refresh();
    follow();
    return () => { abort.abort(); clearTimeout(timer); };
  };
})();
