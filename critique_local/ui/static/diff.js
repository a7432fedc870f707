"use strict";
// The run's patch, file by file: a parser for git's diff format (renames, copies, binary,
// mode and symlink changes, quoted names) and two views, unified and side by side. Code is
// highlighted from Prism's token tree (Prism.tokenize) and word changes come from jsdiff
// (Diff.diffWordsWithSpace): both give data, which is rendered as text nodes.
(function () {
  const UI = window.UI;
  const h = UI.h;
  const MAX_LINES_PER_FILE = 4000;
  const SYMLINK = "120000";

  // git's C-style quoting ("a\tb\303\251") -> the name, bytes decoded as UTF-8.
  function unquote(s) {
    if (!s.startsWith('"')) return s;
    const bytes = [];
    const esc = { a: 7, b: 8, t: 9, n: 10, v: 11, f: 12, r: 13, '"': 34, "\\": 92 };
    for (let i = 1; i < s.length; i++) {
      const c = s[i];
      if (c === '"') break;
      if (c !== "\\") { bytes.push(...new TextEncoder().encode(c)); continue; }
      const n = s[++i];
      if (/[0-7]/.test(n)) { bytes.push(parseInt(s.substr(i, 3), 8)); i += 2; }
      else bytes.push(esc[n] !== undefined ? esc[n] : n.charCodeAt(0));
    }
    return new TextDecoder().decode(new Uint8Array(bytes));
  }

  function stripPrefix(p) {
    if (p === "/dev/null") return null;
    const name = unquote(p.replace(/\t$/, ""));
    return name.replace(/^[ab]\//, "");
  }

  // "diff --git a/x b/x": names from the line itself (used when no ---/+++ lines follow).
  function gitLineNames(rest) {
    if (rest.startsWith('"')) {
      const m = rest.match(/^("(?:[^"\\]|\\.)*")\s+(.*)$/);
      if (m) return [stripPrefix(m[1]), stripPrefix(m[2])];
    }
    const half = (rest.length - 1) / 2;
    if (Number.isInteger(half) && rest.slice(2, half) === rest.slice(half + 3)) {
      return [rest.slice(2, half), rest.slice(half + 3)];
    }
    const parts = rest.split(" b/");
    return [stripPrefix(parts[0]), parts.slice(1).join(" b/")];
  }

  UI.parsePatch = function (text) {
    const lines = text.split("\n");
    if (lines.length && lines[lines.length - 1] === "") lines.pop();
    const files = [];
    let f = null;
    let i = 0;
    while (i < lines.length) {
      const line = lines[i++];
      if (line.startsWith("diff --git ")) {
        const [a, b] = gitLineNames(line.slice(11));
        f = { oldPath: a, newPath: b, status: "modified", binary: false, oldMode: null, newMode: null,
              hunks: [], additions: 0, deletions: 0 };
        files.push(f);
        continue;
      }
      if (!f) continue;
      let m;
      if ((m = line.match(/^new file mode (\d+)/))) { f.status = "added"; f.newMode = m[1]; }
      else if ((m = line.match(/^deleted file mode (\d+)/))) { f.status = "deleted"; f.oldMode = m[1]; }
      else if ((m = line.match(/^old mode (\d+)/))) f.oldMode = m[1];
      else if ((m = line.match(/^new mode (\d+)/))) f.newMode = m[1];
      else if (line.startsWith("rename from ")) { f.status = "renamed"; f.oldPath = unquote(line.slice(12)); }
      else if (line.startsWith("rename to ")) { f.status = "renamed"; f.newPath = unquote(line.slice(10)); }
      else if (line.startsWith("copy from ")) { f.status = "copied"; f.oldPath = unquote(line.slice(10)); }
      else if (line.startsWith("copy to ")) { f.status = "copied"; f.newPath = unquote(line.slice(8)); }
      else if ((m = line.match(/^index [0-9a-f]+\.\.[0-9a-f]+ (\d+)/))) { f.oldMode = f.oldMode || m[1]; f.newMode = f.newMode || m[1]; }
      else if (line.startsWith("Binary files ") || line === "GIT binary patch") {
        f.binary = true;
        while (i < lines.length && !lines[i].startsWith("diff --git ")) i++;
      }
      else if (line.startsWith("--- ")) { const p = stripPrefix(line.slice(4)); if (p !== null) f.oldPath = p; }
      else if (line.startsWith("+++ ")) { const p = stripPrefix(line.slice(4)); if (p !== null) f.newPath = p; }
      else if ((m = line.match(/^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@(.*)$/))) {
        let oldNo = Number(m[1]), newNo = Number(m[3]);
        let oldLeft = m[2] === undefined ? 1 : Number(m[2]);
        let newLeft = m[4] === undefined ? 1 : Number(m[4]);
        const hunk = { header: line, lines: [] };
        f.hunks.push(hunk);
        while (i < lines.length && (oldLeft > 0 || newLeft > 0 || lines[i].startsWith("\\"))) {
          const l = lines[i++];
          const kind = l[0] || " ";
          const body = l.slice(1);
          if (kind === "+") { hunk.lines.push({ kind, text: body, newNo: newNo++ }); newLeft--; f.additions++; }
          else if (kind === "-") { hunk.lines.push({ kind, text: body, oldNo: oldNo++ }); oldLeft--; f.deletions++; }
          else if (kind === "\\") hunk.lines.push({ kind, text: l });
          else { hunk.lines.push({ kind: " ", text: body, oldNo: oldNo++, newNo: newNo++ }); oldLeft--; newLeft--; }
        }
      }
    }
    for (const file of files) {
      file.symlink = file.oldMode === SYMLINK || file.newMode === SYMLINK;
      file.modeChanged = !!(file.oldMode && file.newMode && file.oldMode !== file.newMode);
      file.path = file.status === "deleted" ? file.oldPath : file.newPath;
    }
    return files;
  };

  const LANGS = { py: "python", js: "javascript", mjs: "javascript", cjs: "javascript", ts: "typescript",
    tsx: "typescript", jsx: "javascript", sh: "bash", bash: "bash", json: "json", yml: "yaml", yaml: "yaml",
    md: "markdown", go: "go", rs: "rust", java: "java", c: "c", h: "c", cc: "cpp", cpp: "cpp", hpp: "cpp",
    toml: "toml", css: "css", html: "markup", xml: "markup", svg: "markup" };

  function grammarFor(path) {
    const P = window.Prism;
    if (!P || !P.languages || !path) return null;
    const ext = path.includes(".") ? path.split(".").pop().toLowerCase() : "";
    const name = LANGS[ext];
    return name && P.languages[name] ? P.languages[name] : null;
  }

  function tokens(parent, toks) {
    for (const t of toks) {
      if (typeof t === "string") { parent.append(document.createTextNode(t)); continue; }
      const span = h("span", { class: "tok tok-" + String(t.type).replace(/[^\w-]/g, "") });
      tokens(span, Array.isArray(t.content) ? t.content : [t.content]);
      parent.append(span);
    }
  }

  function code(text, grammar) {
    const cell = h("code", {});
    if (grammar && text.length < 2000) {
      try { tokens(cell, window.Prism.tokenize(text, grammar)); return cell; } catch (_) { /* plain */ }
    }
    cell.textContent = text;
    return cell;
  }

  function words(oldText, newText) {
    const D = window.Diff;
    if (!D || oldText.length + newText.length > 4000) return null;
    const left = h("code", {}), right = h("code", {});
    for (const part of D.diffWordsWithSpace(oldText, newText)) {
      if (!part.added) left.append(part.removed ? h("span", { class: "w-del" }, part.value) : document.createTextNode(part.value));
      if (!part.removed) right.append(part.added ? h("span", { class: "w-add" }, part.value) : document.createTextNode(part.value));
    }
    return [left, right];
  }

  function badges(f) {
    const out = [UI.badge(f.status, "k-" + f.status)];
    if (f.binary) out.push(UI.badge("binary", "k-binary"));
    if (f.symlink) out.push(UI.badge("symlink", "k-symlink"));
    if (f.modeChanged) out.push(UI.badge(`mode ${f.oldMode} → ${f.newMode}`, "k-mode"));
    return out;
  }

  function title(f) {
    return f.status === "renamed" || f.status === "copied" ? `${f.oldPath} → ${f.newPath}` : f.path;
  }

  function unifiedRows(f, grammar) {
    const rows = [];
    for (const hunk of f.hunks) {
      rows.push(h("tr", { class: "hunk" }, h("td", { colspan: 3 }, hunk.header)));
      for (const l of hunk.lines) {
        const cls = l.kind === "+" ? "add" : l.kind === "-" ? "del" : l.kind === "\\" ? "meta" : "ctx";
        rows.push(h("tr", { class: cls }, h("td", { class: "no" }, l.oldNo || ""), h("td", { class: "no" }, l.newNo || ""),
          h("td", { class: "code" }, l.kind === "\\" ? l.text : [l.kind, code(l.text, grammar)])));
      }
    }
    return rows;
  }

  function splitRows(f, grammar) {
    const rows = [];
    const row = (o, n, pair) => {
      const left = o ? (pair ? pair[0] : code(o.text, grammar)) : "";
      const right = n ? (pair ? pair[1] : code(n.text, grammar)) : "";
      return h("tr", {},
        h("td", { class: "no" }, o ? o.oldNo : ""), h("td", { class: "code " + (o ? (o.kind === "-" ? "del" : "ctx") : "empty") }, left),
        h("td", { class: "no" }, n ? n.newNo : ""), h("td", { class: "code " + (n ? (n.kind === "+" ? "add" : "ctx") : "empty") }, right));
    };
    for (const hunk of f.hunks) {
      rows.push(h("tr", { class: "hunk" }, h("td", { colspan: 4 }, hunk.header)));
      let dels = [], adds = [];
      const flush = () => {
        for (let k = 0; k < Math.max(dels.length, adds.length); k++) {
          const o = dels[k], n = adds[k];
          rows.push(row(o, n, o && n ? words(o.text, n.text) : null));
        }
        dels = []; adds = [];
      };
      for (const l of hunk.lines) {
        if (l.kind === "-") dels.push(l);
        else if (l.kind === "+") adds.push(l);
        else if (l.kind === "\\") continue;
        else { flush(); rows.push(row(l, l, null)); }
      }
      flush();
    }
    return rows;
  }

  // One section per file; mode "unified" or "split".
  UI.renderDiff = function (files, mode) {
    const box = h("div", { class: "diff" });
    box.append(h("ul", { class: "files" }, files.map((f, n) =>
      h("li", {}, h("a", { href: "#", class: "file-link", dataset: { file: String(n) } }, title(f)), " ", badges(f),
        h("span", { class: "stat" }, ` +${f.additions} −${f.deletions}`)))));
    files.forEach((f, n) => {
      const grammar = grammarFor(f.path);
      const section = h("section", { class: "file", id: "file-" + n, dataset: { path: f.path || "" } },
        h("h4", {}, h("span", { class: "path" }, title(f)), " ", badges(f)));
      const lineCount = f.hunks.reduce((s, hk) => s + hk.lines.length, 0);
      if (f.binary) section.append(h("p", { class: "muted" }, "Binary file: contents not shown (the downloaded patch has them)."));
      else if (lineCount > MAX_LINES_PER_FILE) section.append(h("p", { class: "muted" }, `${lineCount} changed lines: too large to show; download the patch.`));
      else if (f.hunks.length) {
        const rows = mode === "split" ? splitRows(f, grammar) : unifiedRows(f, grammar);
        section.append(h("table", { class: "lines " + mode }, h("tbody", {}, rows)));
      } else if (f.modeChanged) section.append(h("p", { class: "muted" }, `Mode changed from ${f.oldMode} to ${f.newMode}.`));
      else if (f.status === "renamed" || f.status === "copied") section.append(h("p", { class: "muted" }, "Same content."));
      else section.append(h("p", { class: "muted" }, "Empty file."));
      if (f.symlink && !f.binary) section.append(h("p", { class: "muted" }, "A symbolic link: the lines are its target."));
      box.append(section);
    });
    box.addEventListener("click", (e) => {
      const link = e.target.closest("a.file-link");
      if (!link) return;
      e.preventDefault();
      const target = box.querySelector("#file-" + link.dataset.file);
      if (target) target.scrollIntoView();
    });
    return box;
  };
})();
