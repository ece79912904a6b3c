"""The web dashboard in a real browser: headless Chromium against a real keter.

Chromium is driven through the DevTools protocol over ``--remote-debugging-pipe``
(JSON messages separated by NUL bytes on file descriptors 3 and 4), so no
WebSocket client or browser download is needed. Screenshots go to
test-artifacts/ for a human to look at.
"""

from __future__ import annotations

from support.browser import ARTIFACTS
from support.bundles import NOISE_SHOWN, TERMINAL_CONTROL, make_bundle, noisy_app, webapp_config
from support.daemon import status_api
from support.net import free_port, get
from support.wait import wait_for

# The status API on TCP asks every request to log in (issue 11.6).
USER = ("ops", "dashboard-pw")
LOGIN_SETTINGS = {"dashboard-users": dict([USER])}

LONG_HOST = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters

ROWS = """[...document.querySelectorAll('#apps tbody tr')].map(tr => [
    tr.dataset.app, tr.querySelector('.state .badge').textContent,
    tr.querySelector('.hosts a') ? tr.querySelector('.hosts a').href : null])"""


def test_dashboard_lists_apps_and_follows_a_state_change_without_reload(
    keter_factory, private_nginx, browser, tmp_path
):
    port = free_port()
    keter = keter_factory(**LOGIN_SETTINGS, **{"status-listen": f"127.0.0.1:{port}"})
    client = status_api(keter)
    # alpha.te's link went to alpha.test, whose URL begins with its name. A host of the
    # longest length pushed every app's other columns out of view.
    # A name that ends in a number (browsers' URL parser throws on it) blanked the list.
    hosts = ["alpha.te", LONG_HOST, "alpha.1"]
    alpha = webapp_config("alpha.test", "v1", **{"extra-hosts": hosts})
    keter.drop(make_bundle(tmp_path / "alpha.keter", config=alpha))
    browser.open(f"http://127.0.0.1:{port}/")  # not logged in: nothing but the refusal
    # Headless Chromium has no login prompt: it gives up on the page with an error page.
    wait_for(lambda: browser.js("location.href").startswith("chrome-error:"), 10, "a refusal")
    assert browser.js("document.querySelector('#apps')") is None
    browser.log_in(*USER)
    broken = webapp_config("beta.test", "v1", args=["--exit-at-start", "3"])
    keter.drop(make_bundle(tmp_path / "beta.keter", config=broken))
    states = {"alpha": "running", "beta": "failed"}
    wait_for(
        lambda: {a["name"]: a["state"] for a in client.status()["apps"]} == states,
        20,
        "alpha running and beta failed",
    )

    browser.open(f"http://127.0.0.1:{port}/")
    rows = wait_for(lambda: len(browser.js(ROWS) or []) == 2 and browser.js(ROWS), 10, "rows")
    assert rows == [
        ["alpha", "running", f"http://alpha.test:{private_nginx.port}/"],
        ["beta", "failed", None],  # nothing serves beta: no link
    ]
    links = browser.js(
        "[...document.querySelectorAll('.hosts a')].map(a => [a.textContent, a.href])"
    )
    assert sorted(links) == sorted(
        [host, f"http://{host}:{private_nginx.port}/"]
        for host in ("alpha.te", "alpha.test", LONG_HOST, "alpha.1")
    )
    widths = "['#apps', 'main'].map(s => document.querySelector(s).offsetWidth)"
    table, page = browser.js(widths)
    assert table <= page, (table, page)
    events = browser.js("document.getElementById('events').textContent")
    assert "failed: exited with status 3 before answering" in events
    browser.js("window.keterTestMarker = 42")  # gone if the page ever reloads
    browser.screenshot(ARTIFACTS / "dashboard-list.png")

    # beta gets a working version: the open page shows it by itself.
    keter.drop(make_bundle(tmp_path / "beta.keter", config=webapp_config("beta.test", "v2")))
    wait_for(
        lambda: ["beta", "running", f"http://beta.test:{private_nginx.port}/"] in browser.js(ROWS),
        20,
        "the page to show beta running",
    )
    assert browser.js("window.keterTestMarker") == 42
    browser.screenshot(ARTIFACTS / "dashboard-list-updated.png")


def test_app_page_shows_history_and_log_and_its_restart_button_works(
    keter_factory, browser, tmp_path
):
    port = free_port()
    keter = keter_factory(**LOGIN_SETTINGS, **{"status-listen": f"127.0.0.1:{port}"})
    client = status_api(keter)
    keter.drop(make_bundle(tmp_path / "alpha.keter", config=webapp_config("alpha.test", "v1")))
    wait_for(lambda: client.app("alpha")["state"] == "running", 20, "alpha to run")
    browser.log_in(*USER)

    browser.open(f"http://127.0.0.1:{port}/app/alpha")
    history = "document.querySelectorAll('#history tbody tr').length"
    wait_for(lambda: browser.js(history) == 1, 10, "the deploy history")
    wait_for(
        lambda: "listening on port" in browser.js("document.getElementById('log').textContent"),
        10,
        "the log tail",
    )
    assert browser.js("document.getElementById('state').textContent") == "running"

    # The button posts with the page's token; keter redeploys the same version.
    browser.js("document.getElementById('restart').click()")
    message = "document.getElementById('message').textContent"
    wait_for(lambda: "Restarting version" in browser.js(message), 10, "the restart accepted")
    wait_for(lambda: browser.js(history) == 2, 20, "the restart in the history")
    assert [h["outcome"] for h in client.app("alpha")["history"]] == ["serving", "serving"]
    wait_for(
        lambda: browser.js("document.getElementById('log').textContent").count("listening on") == 2,
        10,
        "the new process's lines in the log",
    )
    browser.screenshot(ARTIFACTS / "dashboard-app.png")


def test_text_from_apps_and_bundles_is_shown_inert(keter_factory, browser, tmp_path):
    """Issue 10.6, of record: escape sequences and HTML from an app or a bundle are shown
    as text (escaped), never run by the page."""
    port = free_port()
    keter = keter_factory(**LOGIN_SETTINGS, **{"status-listen": f"127.0.0.1:{port}"})
    client = status_api(keter)
    config = webapp_config("noisy.test", "v1")
    keter.drop(make_bundle(tmp_path / "noisy.keter", config=config, app_source=noisy_app(tmp_path)))
    wait_for(lambda: client.app("noisy")["state"] == "running", 20, "noisy to run")
    hostile = '<img src=x onerror="window.pwned=1">\x1b[31m'
    keter.drop(make_bundle(tmp_path / "noisy.keter", config=webapp_config(hostile, "v2")))
    wait_for(lambda: len(client.app("noisy")["history"]) == 2, 20, "the refused bundle")
    browser.log_in(*USER)

    browser.open(f"http://127.0.0.1:{port}/app/noisy")
    log = "document.getElementById('log').textContent"
    wait_for(lambda: NOISE_SHOWN in (browser.js(log) or ""), 10, "the app's line, escaped")
    history = "document.querySelector('#history tbody').textContent"
    wait_for(lambda: "<img" in (browser.js(history) or ""), 10, "the refusal's reason")
    browser.open(f"http://127.0.0.1:{port}/")
    events = "document.getElementById('events').textContent"
    wait_for(lambda: "<img" in (browser.js(events) or ""), 10, "the event, as text")
    for page in (f"http://127.0.0.1:{port}/app/noisy", f"http://127.0.0.1:{port}/"):
        browser.open(page)
        wait_for(lambda: browser.js("!!document.querySelector('#live.ok')"), 10, "the page")
        text = browser.js("document.body.textContent")
        assert not TERMINAL_CONTROL.search(text.replace("\n", "")), page
        assert browser.js("document.querySelectorAll('main img, main b').length") == 0
        assert browser.js("window.pwned") is None
    browser.screenshot(ARTIFACTS / "dashboard-inert.png")


def test_app_page_draws_the_last_hour_with_deploys_marked(keter_factory, browser, tmp_path):
    """Issue 14.2: the dashboard draws requests, errors and p99 per minute for the last
    hour, and marks each deploy on the time line."""
    port = free_port()
    keter = keter_factory(**LOGIN_SETTINGS, **{"status-listen": f"127.0.0.1:{port}"})
    client = status_api(keter)
    nginx_port = keter.settings["listeners"][0]["port"]

    def traffic(paths: list[str]) -> None:
        for path in paths:
            status, _, _ = get(nginx_port, "chart.test", path)
            assert status in (200, 500)

    for n, version in enumerate(("v1", "v2"), start=1):
        bundle = make_bundle(tmp_path / "chart.keter", config=webapp_config("chart.test", version))
        keter.drop(bundle)
        wait_for(lambda n=n: len(client.app("chart")["history"]) == n, 20, version)
        traffic(["/"] * 12 + ["/answer/500"] * 3)
    history = client.app("chart")["history"]
    assert [h["outcome"] for h in history] == ["serving", "serving"]

    browser.log_in(*USER)
    browser.open(f"http://127.0.0.1:{port}/app/chart")
    requests = """[...document.querySelectorAll('#traffic g.minute')]
        .reduce((sum, g) => sum + Number(g.dataset.requests), 0)"""
    wait_for(lambda: browser.js(requests) == 30, 15, "30 requests drawn")
    assert browser.js("document.querySelectorAll('#traffic g.minute').length") == 60
    errors = requests.replace("requests", "errors")
    assert browser.js(errors) == 6
    assert browser.js("document.querySelectorAll('#traffic rect.errors').length") >= 1
    assert browser.js("!!document.querySelector('#traffic polyline.p99')")
    marks = "[...document.querySelectorAll('#traffic g.mark.serving')].map(g => g.dataset.version)"
    assert sorted(browser.js(marks)) == sorted(h["version"] for h in history)
    browser.screenshot(ARTIFACTS / "dashboard-traffic.png")

    browser.open(f"http://127.0.0.1:{port}/")
    row = "document.querySelector('#apps tr[data-app=chart] .{}').textContent"
    # The list shows the last minute from the stats component's report, sent every second.
    wait_for(lambda: browser.js(row.format("errors")) == "20.0%", 10, "6 of 30 are 5xx")
    assert float(browser.js(row.format("rate"))) > 0
