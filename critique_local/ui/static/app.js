"use strict";
// Sign in and the router: #/signin, #/runs?status=&tag=&repository=, #/runs/{id}, #/new.
(function () {
  const UI = window.UI;
  const h = UI.h;
  let leave = null;
  let signInNote = "";

  UI.signOut = function (why) {
    UI.forgetKey();
    signInNote = why || "";
    if (location.hash !== "#/signin") location.hash = "#/signin";
    else route();
  };

  function signInView(main) {
    const key = h("input", { type: "password", id: "signin-key", name: "key", autocomplete: "off", placeholder: "crt_…", required: true });
    const error = h("p", { class: "err", id: "signin-error", role: "alert" }, signInNote);
    signInNote = "";
    const form = h("form", { id: "signin", class: "signin" },
      h("label", {}, "API key ", key), h("button", { type: "submit", id: "signin-submit" }, "Sign in"), error,
      h("p", { class: "muted small" }, "The key stays in this tab (session storage) and is sent only to this server, in the Authorization header. Create one with ",
        h("code", {}, "critique-local keys create"), "."));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const candidate = key.value.trim();
      if (!/^crt_[\x21-\x7e]+$/.test(candidate)) { error.textContent = "An API key starts with crt_."; return; }
      UI.setKey(candidate);
      try {
        await UI.api("GET", "/runs?limit=1");
      } catch (err) {
        if (err.status === 401) { UI.forgetKey(); error.textContent = `${err.message} (${err.code})`; return; }
        // 403: the key is valid but lacks read:builder; the runs page says why it cannot list runs
      }
      key.value = "";
      location.hash = "#/runs";
    });
    UI.fill(main, h("h2", {}, "Sign in"), form);
    key.focus();
  }

  function route() {
    if (leave) { leave(); leave = null; }
    const main = document.getElementById("main");
    const fresh = main.cloneNode(false);  // views check isConnected: the old view's work stops
    main.replaceWith(fresh);
    const [path, query] = (location.hash.slice(1) || "/runs").split("?");
    const params = new URLSearchParams(query || "");
    document.getElementById("nav").hidden = !UI.key();
    if (!UI.key() || path === "/signin") return signInView(fresh);
    const m = path.match(/^\/runs\/([\w-]+)$/);
    if (m) leave = UI.runView(fresh, m[1]);
    else if (path === "/new") leave = UI.newRunView(fresh);
    else leave = UI.runsView(fresh, params);
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("signout").addEventListener("click", () => UI.signOut("Signed out."));
    window.addEventListener("hashchange", route);
    route();
  });
})();
