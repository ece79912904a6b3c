"""keter's sites with nginx's workers run as a user of their own, as Debian runs them
(www-data). The suite's private nginx runs its workers as root (its temp folders lie in
the test's 0700 tmp dir), and root reads anything: a static root keter had made its
app's alone answered 403 for every file on a real server while every test passed.
Here whatever keter hands nginx's workers must be readable by their user."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.bundles import make_bundle, webapp_config
from support.daemon import KeterDaemon, keter_settings
from support.net import body, get, served
from support.nginx import PrivateNginx
from support.wait import wait_for

SYSTEM_PYTHON = "/usr/bin/python3"  # readable by every user, unlike the tests' own Python
WORKERS_USER = "www-data"


@pytest.fixture
def www_nginx(open_base: Path) -> Iterator[PrivateNginx]:
    nginx = PrivateNginx(open_base / "nginx", user=WORKERS_USER)
    nginx.start()
    try:
        yield nginx
    finally:
        nginx.stop()


def test_workers_of_their_own_serve_static_files_guarded_and_proxied_apps(
    open_base: Path, www_nginx: PrivateNginx
) -> None:
    settings = keter_settings(www_nginx, **{"run-apps-as-root": False})
    keter = KeterDaemon(open_base / "root", settings)
    keter.start()

    def drop(name: str, config: dict, **contents) -> None:
        keter.drop(make_bundle(open_base / f"{name}.keter", config=config, **contents))

    try:
        static = {"stanzas": [{"type": "static-files", "root": "../public", "host": "files.test"}]}
        files = {"public/index.html": "hi", "public/css/site.css": "body{}"}
        drop("files", static, files=files, app_source=None)
        drop("app", webapp_config("app.test", "v1"), interpreter=SYSTEM_PYTHON)
        # basic-auth: keter's copy of the password file, in its support folder.
        guard = [{"basic-auth": {"realm": "Staff", "creds": {"jon": "rocks"}}}]
        stanza = dict(webapp_config("guarded.test", "v1"), type="webapp", middleware=guard)
        drop("guarded", {"stanzas": [stanza]}, interpreter=SYSTEM_PYTHON)

        served(www_nginx, "app.test", "v1")
        wait_for(lambda: body(www_nginx, "files.test", "/index.html") == b"hi", 20, "files")
        assert body(www_nginx, "files.test", "/css/site.css") == b"body{}"
        assert www_nginx.request("files.test", "/config/keter.yaml")[0] == 404
        wait_for(lambda: www_nginx.request("guarded.test")[0] == 401, 20, "the guarded app")
        www_nginx.wait_settled()  # a retiring worker (the old config) may take the next one
        signed = {"Authorization": "Basic am9uOnJvY2tz"}  # jon:rocks
        assert get(www_nginx.port, "guarded.test", "/", signed)[2] == b"v1\n"
        assert "Permission denied" not in www_nginx.error_log_text()
    except AssertionError:
        print(keter.log()[-4000:], www_nginx.error_log_text()[-2000:])  # gone after the test
        raise
    finally:
        keter.stop()


def test_a_listed_static_root_with_another_inside_it_is_listed(
    open_base: Path, www_nginx: PrivateNginx
) -> None:
    # The inner root, published after the outer one, left its folders passable but no
    # longer readable by nginx's workers: the outer root's listing answered 403.
    keter = KeterDaemon(
        open_base / "root", keter_settings(www_nginx, **{"run-apps-as-root": False})
    )
    keter.start()
    try:
        listed = {"type": "static-files", "directory-listing": True}
        stanzas = [
            dict(listed, root="../public", host="files.test"),
            dict(listed, root="../public/docs", host="docs.test"),
        ]
        files = {"public/i.txt": "i", "public/docs/a.txt": "a"}
        bundle = make_bundle(
            open_base / "files.keter", config={"stanzas": stanzas}, files=files, app_source=None
        )
        keter.drop(bundle)
        wait_for(lambda: body(www_nginx, "docs.test", "/a.txt") == b"a", 20, "the inner root")
        www_nginx.wait_settled()
        assert www_nginx.request("docs.test", "/")[0] == 200
        status, _, listing = get(www_nginx.port, "files.test", "/")
        assert status == 200 and b"docs/" in listing and b"i.txt" in listing
        assert "Permission denied" not in www_nginx.error_log_text()
    finally:
        keter.stop()
