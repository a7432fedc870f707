"""The web page (/ui/) in a real headless Chromium (Debian's, driven by Playwright): sign in,
start a scripted run from the form, watch it live, reload mid-run, read the diff, download the
patch, follow up, end the session; untrusted content never runs; a key without read:builder is
told why. Screenshots of the list and run pages are saved under each test's tmp_path."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.browser import DroppingProxy, launch, new_page, violations
from tests.helpers import Server, wait_for

pytestmark = pytest.mark.e2e

RUNS = "/api/v1/coding-agent/runs"
RUN_S = 240_000  # ms: a turn on a loaded 2-core machine
SCRIPT = """Add a greeting module.
@write greeting.py
def greet(name):
    return f"Hello, {name}!"
@end
@sleep 3
@bash python3 -c "from greeting import greet; print(greet('Ada'))"
@sleep 3
@say Added greeting.py with greet(name).
"""
FOLLOW_UP = """Add a farewell.
@write farewell.py
def farewell(name):
    return f"Goodbye, {name}!"
@end
@say Added farewell.py.
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = launch(pw)
        yield b
        b.close()


def shown_ids(page: Page) -> list[int]:
    return [int(i) for i in page.locator("#activity li").evaluate_all("els => els.map(e => e.dataset.id)")]


def api_event_ids(api: httpx.Client, run_id: str) -> list[int]:
    return [e["id"] for e in api.get(f"{RUNS}/{run_id}", params={"events": "1"}).json()["run"]["events"]]


def test_sign_in_start_watch_reload_diff_follow_up_and_end(server: Server, alice: str, browser: Browser,
                                                            tmp_path: Path) -> None:
    page, errors = new_page(browser)
    page.goto(server.url + "/ui/")
    page.fill("#signin-key", "crt_" + "0" * 40)
    page.click("#signin-submit")
    expect(page.locator("#signin-error")).to_contain_text("invalid")
    page.fill("#signin-key", alice)
    page.click("#signin-submit")
    expect(page.locator("#runs-body")).to_be_visible()
    assert alice not in page.url

    # the form: models from /models, the API's error next to the field it names
    page.click("#nav-new")
    expect(page.locator("#new-model option[value='critique/scripted']")).to_have_count(1)
    page.fill("#new-repository", "acme/missing")
    page.fill("#new-prompt", "@say hi")
    page.click("#new-submit")
    expect(page.locator("[data-field=repository] .field-error")).to_contain_text("repository_not_found")
    page.fill("#new-repository", "acme/web")
    page.fill("#new-prompt", SCRIPT)
    page.select_option("#new-model", "critique/scripted")
    page.fill("#new-title", "Greeting from the page")
    page.fill("#new-tags", "ui, e2e")
    page.click("#new-submit")
    page.wait_for_url(re.compile(r"#/runs/run_\w+$"))
    run_id = page.url.rsplit("/", 1)[1]

    with server.client(alice) as api:
        # live: the write arrives while the turn is still going (the model sleeps after it)
        expect(page.locator("#activity li.ev-tool", has_text="write").first).to_be_visible(timeout=RUN_S)
        assert api.get(f"{RUNS}/{run_id}").json()["run"]["status"] == "running"
        page.reload()  # mid-run: the page catches up from the start and follows on
        expect(page.locator("#run-status")).to_have_text("idle", timeout=RUN_S)
        expect(page.locator("#activity li.ev-tool", has_text="bash").first).to_be_visible()
        expect(page.locator("#activity li").last).to_contain_text("idle")
        ids = shown_ids(page)
        assert ids == list(range(1, len(ids) + 1)) and ids == api_event_ids(api, run_id)  # no gap, no duplicate
        expect(page.locator("#run-summary")).to_have_text("Added greeting.py with greet(name).")
        expect(page.locator("#run-head")).not_to_contain_text("null")

        # the diff: the added file, highlighted, unified and side by side
        added = page.locator("#diff section.file[data-path='greeting.py']")
        expect(added).to_contain_text("Hello, {name}!")
        expect(added.locator(".badge.k-added")).to_have_count(1)
        expect(added.locator(".tok-keyword").first).to_have_text("def")  # Prism, from the npm package
        page.click("#diff-split")
        expect(page.locator("#diff table.lines.split")).to_have_count(1)
        with page.expect_download() as download:
            page.click("#download")
        saved = tmp_path / "downloaded.patch"
        download.value.save_as(saved)
        assert saved.read_bytes() == api.get(f"{RUNS}/{run_id}/patch").content
        page.screenshot(path=str(tmp_path / "run-page.png"), full_page=True)

        # follow-up: turn 2 on the same run
        page.fill("#followup-prompt", FOLLOW_UP)
        page.click("#followup-send")
        expect(page.locator("#turns li[data-index='2']")).to_contain_text("Added farewell.py.", timeout=RUN_S)
        expect(page.locator("#run-status")).to_have_text("idle", timeout=RUN_S)
        expect(page.locator("#diff section.file[data-path='farewell.py']")).to_contain_text("Goodbye")
        ids = shown_ids(page)
        assert ids == list(range(1, len(ids) + 1)) and ids == api_event_ids(api, run_id)

        # the list in another tab follows live: the row turns completed without a reload
        listing, list_errors = new_page(browser, alice)
        listing.goto(server.url + "/ui/#/runs?tag=ui")
        row = listing.locator(f"#runs-body tr[data-run='{run_id}']")
        expect(row).to_contain_text("idle")
        page.click("#end-session")
        expect(page.locator("#run-status")).to_have_text("completed", timeout=60_000)
        expect(row).to_contain_text("completed", timeout=30_000)
        assert list_errors == []
        listing.context.close()
        assert wait_for(api, run_id, {"completed"})["sessionActive"] is False

    # the list: filtered by tag, the run as a row
    page.goto(server.url + "/ui/#/runs?tag=ui")
    row = page.locator(f"#runs-body tr[data-run='{run_id}']")
    expect(row).to_contain_text("Greeting from the page")
    expect(row).to_contain_text("completed")
    page.screenshot(path=str(tmp_path / "runs-list.png"), full_page=True)
    assert errors == [] and violations(page) == []
    print(f"screenshots: {tmp_path / 'run-page.png'} {tmp_path / 'runs-list.png'}")


XSS = [
    '<img src=x onerror="window.__xss=1">',
    "</script><script>window.__xss=2</script>",
]
FILE_NAME = "<img src=x onerror=window.__xss=3>.txt"
XSS_SCRIPT = f"""{XSS[0]} {XSS[1]}
@write {FILE_NAME}
{XSS[0]}
{XSS[1]}
@end
@bash cat '{FILE_NAME}'
@bash rm README.md && chmod +x app.py && ln -s app.py link.py && printf '\\000\\001\\002' > blob.bin && echo hi > café.txt
@say Done {XSS[0]}{XSS[1]}
"""


def test_untrusted_content_is_shown_as_text_and_never_runs(server: Server, alice: str, browser: Browser,
                                                           tmp_path: Path) -> None:
    with server.client(alice) as api:
        run = api.post(RUNS, json={"repository": "acme/web", "prompt": XSS_SCRIPT, "title": XSS[0] + XSS[1],
                                   "tags": ["xss"]}).json()["run"]
        done = wait_for(api, run["id"], {"idle", "failed"})
        assert done["status"] == "idle", done["error"]
        assert FILE_NAME in done["changedPaths"]

    page, errors = new_page(browser, alice)
    page.goto(f"{server.url}/ui/#/runs/{run['id']}")
    expect(page.locator("#run-status")).to_have_text("idle", timeout=60_000)
    expect(page.locator("#run-title")).to_have_text(XSS[0] + XSS[1])
    expect(page.locator("#activity li").last).to_contain_text("idle")  # every event, the closing one too
    with server.client(alice) as api:
        assert shown_ids(page) == api_event_ids(api, run["id"])
    expect(page.locator("#run-summary")).to_have_text(f"Done {XSS[0]}{XSS[1]}")
    # every kind of change shown for what it is (run patches have no renames: see the parser test)
    for path, kind in (("README.md", "k-deleted"), ("app.py", "k-mode"), ("link.py", "k-symlink"),
                       ("blob.bin", "k-binary"), ("café.txt", "k-added"), (FILE_NAME, "k-added")):
        expect(page.locator(f"#diff section.file[data-path={json.dumps(path, ensure_ascii=False)}] h4 .{kind}")).to_have_count(1)
    expect(page.locator("#diff section.file[data-path='app.py'] h4")).to_contain_text("mode 100644 → 100755")
    expect(page.locator("#diff section.file[data-path='link.py']")).to_contain_text("symbolic link")
    diff = page.locator("#diff section.file").filter(has=page.locator(".path", has_text=FILE_NAME))
    expect(diff).to_contain_text(XSS[0])
    expect(diff).to_contain_text(XSS[1])
    assert XSS[0] in (page.locator("#turns pre.prompt").first.text_content() or "")
    expect(page.locator("#activity li.ev-tool", has_text="completed").filter(has_text="cat ").last).to_contain_text(XSS[1])
    page.click("#diff-split")
    expect(diff.locator("table.lines.split")).to_contain_text(XSS[1])
    page.screenshot(path=str(tmp_path / "xss-run.png"), full_page=True)
    page.goto(f"{server.url}/ui/#/runs?tag=xss")
    expect(page.locator(f"#runs-body tr[data-run='{run['id']}']")).to_contain_text(XSS[0])

    assert page.evaluate("window.__xss") is None
    assert page.locator("img").count() == 0 and page.locator("script:not([src])").count() == 0
    assert violations(page) == [] and errors == []  # nothing was even attempted: all of it is text
    page.screenshot(path=str(tmp_path / "xss-list.png"), full_page=True)


def test_a_dropped_stream_resumes_after_the_last_row_and_cancel_ends_the_run(server: Server, alice: str,
                                                                             browser: Browser) -> None:
    with server.client(alice) as api:
        run = api.post(RUNS, json={"repository": "acme/web", "prompt": (
            "@bash echo one\n@sleep 4\n@bash echo two\n@sleep 60\n@say never")}).json()["run"]
        page, errors = new_page(browser, alice)
        streams: list[dict[str, str]] = []
        page.on("request", lambda r: streams.append(r.headers) if r.url.endswith("/stream") else None)
        with DroppingProxy(server.port) as proxy:
            page.goto(f"{proxy.url}/ui/#/runs/{run['id']}")
            expect(page.locator("#activity li.ev-tool", has_text="echo one").first).to_be_visible(timeout=RUN_S)
            proxy.drop()  # the connection drops mid-run: the page reconnects after its last row
            expect(page.locator("#activity li.ev-tool", has_text="completed").filter(has_text="echo two")).to_have_count(
                1, timeout=RUN_S)
            assert len(streams) >= 2 and all(h.get("last-event-id") for h in streams[1:])
            ids = shown_ids(page)
            assert ids == list(range(1, len(ids) + 1)) and api_event_ids(api, run["id"])[: len(ids)] == ids

            page.on("dialog", lambda d: d.accept())
            page.click("#cancel")
            expect(page.locator("#run-status")).to_have_text("cancelled", timeout=60_000)
            assert api.get(f"{RUNS}/{run['id']}").json()["run"]["status"] == "cancelled"
            expect(page.locator("#activity li").last).to_contain_text("cancelled")
            ids = shown_ids(page)
            assert ids == api_event_ids(api, run["id"])
            assert errors == [] and violations(page) == []
            page.context.close()


def test_a_key_without_read_scope_is_told_why_and_sign_out_forgets_the_key(server: Server, browser: Browser) -> None:
    writer = server.new_key("ui-writer", scopes="write:builder")
    page, errors = new_page(browser)
    page.goto(server.url + "/ui/")
    page.fill("#signin-key", writer)
    page.click("#signin-submit")
    expect(page.locator("#forbidden")).to_contain_text("read:builder")
    page.click("#signout")
    expect(page.locator("#signin")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    page.goto(server.url + "/ui/#/runs")
    expect(page.locator("#signin")).to_be_visible()  # signed out: the page asks for a key again
    assert errors == [] and violations(page) == []


def test_the_diff_parser_reads_renames_copies_and_quoted_names(browser: Browser, server: Server, tmp_path: Path) -> None:
    """Run patches are written without rename detection; a patch made with it (git diff -M -C)
    still shows renames and copies for what they are, and quoted names decoded."""
    repo = tmp_path / "r"
    repo.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    body = "".join(f"line {i}\n" for i in range(30))
    (repo / "old name.py").write_text(body)
    (repo / "src.py").write_text(body.replace("line", "row"))
    git("add", "-A")
    git("commit", "-qm", "base")
    (repo / "old name.py").rename(repo / "new\tnäme.py")
    (repo / "copy.py").write_text((repo / "src.py").read_text() + "extra\n")
    git("add", "-A")
    patch = git("-c", "core.quotePath=true", "diff", "--cached", "-M", "-C", "--find-copies-harder", "--binary")
    page, errors = new_page(browser)
    page.goto(server.url + "/ui/")
    parsed = page.evaluate("t => UI.parsePatch(t).map(f => [f.status, f.oldPath, f.newPath])", patch)
    assert sorted(parsed) == [["copied", "src.py", "copy.py"], ["renamed", "old name.py", "new\tnäme.py"]]
    assert errors == []
