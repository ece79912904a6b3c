"""The app's dashboard page sets and unsets its settings (``keter env``, issue 13), in a
real browser against a real keter: the value reaches the app and never the page."""

from __future__ import annotations

import json

import pytest
from support.browser import ARTIFACTS
from support.bundles import make_bundle, webapp_config
from support.daemon import status_api
from support.net import body, free_port
from support.wait import wait_for

from keter.client import ApiError, KeterClient

USER = ("ops", "dashboard-pw")
SECRET = "dashboard-s3cret-value"


def app_env(nginx) -> dict:
    data = body(nginx, "alpha.test", "/env")
    return json.loads(data) if data else {}


def test_the_app_page_sets_and_unsets_a_setting(keter_factory, private_nginx, browser, tmp_path):
    port = free_port()
    keter = keter_factory(**{"dashboard-users": dict([USER]), "status-listen": f"127.0.0.1:{port}"})
    client = status_api(keter)
    keter.drop(make_bundle(tmp_path / "alpha.keter", config=webapp_config("alpha.test", "v1")))
    wait_for(lambda: client.app("alpha")["state"] == "running", 20, "alpha to run")
    browser.log_in(*USER)
    browser.open(f"http://127.0.0.1:{port}/app/alpha")
    settings = "document.getElementById('settings').textContent"
    wait_for(lambda: "No settings." in (browser.js(settings) or ""), 10, "the settings card")

    browser.js(
        "document.getElementById('setting-name').value = 'API_KEY';"
        f"document.getElementById('setting-value').value = '{SECRET}';"
        "document.getElementById('setting-set').click()"
    )
    message = "document.getElementById('message').textContent"
    wait_for(lambda: "Set API_KEY; restarting" in browser.js(message), 10, "the change accepted")
    wait_for(lambda: app_env(private_nginx).get("API_KEY") == SECRET, 20, "the app to have it")
    wait_for(lambda: "API_KEY" in browser.js(settings), 10, "the name listed")
    # The value went in; nothing on the page shows it, not even the field it was typed in.
    assert SECRET not in browser.js("document.documentElement.outerHTML")
    assert browser.js("document.getElementById('setting-value').value") == ""
    browser.screenshot(ARTIFACTS / "dashboard-settings.png")

    browser.js("document.querySelector('#settings button[data-name=API_KEY]').click()")
    wait_for(lambda: "Unset API_KEY" in browser.js(message), 10, "the unset accepted")
    wait_for(lambda: "API_KEY" not in app_env(private_nginx), 20, "the app without it")
    wait_for(lambda: "No settings." in browser.js(settings), 10, "no name listed")


def test_settings_writes_need_the_token_and_names_are_checked(keter) -> None:
    client = status_api(keter)
    url = "/api/apps/alpha/env"
    raw = KeterClient(keter.root)
    raw._token = "wrong"
    with pytest.raises(ApiError) as refused:
        raw.post(url, {"set": {"A": "1"}})
    assert refused.value.status == 403
    with pytest.raises(ApiError) as bad:
        client.post(url, {"set": {"PORT": "1"}})
    assert bad.value.status == 400 and "set by keter" in str(bad.value)
    stored = client.post(url, {"set": {"A": "1"}, "restart": True})
    assert stored == {"app": "alpha", "set": ["A"], "unset": [], "restart": None}  # not running
    assert client.get(url) == {"app": "alpha", "names": ["A"]}
