"""Every app process gets /tmp, /var/tmp, /dev/shm and IPC of its own, which go with it
(keter.processes.private).

An adversarial probe had found them shared by all apps: an app limited to 64M wrote
48 MiB to /dev/shm per version, 240 MiB after five deploys, all of it still there
after the app's removal; a SysV segment and /tmp files outlived the app; with umask
022 one app read another's /tmp/alpha-session.txt. Against the real daemon as root,
each app a user of its own (tests/apps/private_app.py says what it saw).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from support.bundles import APPS, make_bundle, member, webapp_config
from support.net import app_port_range, served
from support.wait import wait_for

from keter.processes.private import Private, remove_ipc, running_uids, sysv_objects
from keter.processes.programs import SETPRIV
from keter.processes.reaper import Reaper

SYSTEM_PYTHON = "/usr/bin/python3"  # the tests' own Python may lie in /tmp, which is hidden
PRIVATE_APP = APPS / "private_app.py"


@pytest.fixture
def root_outside_tmp() -> Iterator[Path]:
    """A keter ROOT outside /tmp and /var/tmp (pytest's folders are in /tmp: an app's
    private /tmp would hide them, so keter keeps the machine's there)."""
    base = Path(tempfile.mkdtemp(prefix="keter-private-", dir="/var/lib"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def deploy(keter, base: Path, app: str, **env: str) -> dict:
    """Deploy ``app`` (private_app.py), wait until it serves; what it saw."""
    config = webapp_config(f"{app}.test", "v1", env={"APPNAME": app, **env})
    bundle = make_bundle(
        base / f"{app}.keter", config=config, app_source=PRIVATE_APP, interpreter=SYSTEM_PYTHON
    )
    keter.drop(bundle)
    log = keter.root / "log" / f"app-{app}.log"
    line = wait_for(
        lambda: next((x for x in _lines(log) if "PRIVATE {" in x), None), 30, f"{app}'s report"
    )
    return json.loads(line.split("PRIVATE ", 1)[1])


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def uid_processes(uid: int) -> list[int]:
    found = []
    for process in psutil.process_iter(["uids", "status"]):
        try:
            if process.info["uids"].real == uid and process.info["status"] != "zombie":
                found.append(process.pid)
        except (psutil.Error, AttributeError):
            continue
    return found


def folders_of(keter, app: str) -> list[Path]:
    return sorted((keter.root / "run" / "tmp").glob(f"{app}-*"))


@pytest.mark.skipif(SETPRIV is None, reason="needs util-linux setpriv")
def test_an_apps_tmp_shm_and_ipc_are_its_own_and_go_when_it_is_removed(
    root_outside_tmp, keter_factory, private_nginx
):
    keter = keter_factory(
        root=root_outside_tmp / "root",
        **{
            "port-range": app_port_range(),
            "run-apps-as-root": False,
            "app-limits": {"memory": "64M"},
        },
    )
    said = "every app process gets /tmp, /var/tmp and /dev/shm of its own"
    wait_for(lambda: said in keter.log(), 10, "keter's line at start")
    alpha = deploy(keter, root_outside_tmp, "alpha", SECRET="alpha-session-key-42", SHM_MB="16")
    [alpha_folder] = folders_of(keter, "alpha")
    beta = deploy(
        keter,
        root_outside_tmp,
        "beta",
        PEEK=f"/tmp/alpha-secret.txt:{alpha_folder}/tmp/alpha-secret.txt",
    )
    served(private_nginx, "alpha.test", "v1")
    served(private_nginx, "beta.test", "v1")
    uids = json.loads((keter.root / "etc" / "app-users.json").read_text())

    # Nothing of alpha's /tmp reaches beta: not by its name, not by its folder (0700).
    assert beta["peeked"] == {
        "/tmp/alpha-secret.txt": "No such file or directory",
        f"{alpha_folder}/tmp/alpha-secret.txt": "Permission denied",
    }, beta
    assert alpha["umask"] == beta["umask"] == "077"
    assert alpha["secret_mode"] == "600"
    assert alpha["tmpdir"] is None  # /tmp itself is its own
    # On the machine: in alpha's folder, nowhere else; its /dev/shm is a tmpfs of its own
    # as big as its memory limit, its System V objects in an IPC namespace of its own.
    secret = alpha_folder / "tmp" / "alpha-secret.txt"
    assert secret.read_text() == "alpha-session-key-42"
    assert (secret.stat().st_uid, secret.stat().st_mode & 0o777) == (uids["alpha"], 0o600)
    assert (alpha_folder / "var-tmp" / "alpha-var.txt").exists()
    assert not Path("/tmp/alpha-secret.txt").exists()
    assert not Path("/var/tmp/alpha-var.txt").exists()
    assert not Path("/dev/shm/alpha-shm").exists()
    assert alpha["shm_bytes"] == 64 << 20
    assert alpha["ipc"] == beta["ipc"] == [0, 0, 0]  # each made its three objects
    assert sysv_objects({uids["alpha"]}) == [] and sysv_objects({uids["beta"]}) == []

    (keter.incoming / "alpha.keter").unlink()
    wait_for(lambda: folders_of(keter, "alpha") == [], 20, "alpha's folders removed")
    wait_for(lambda: uid_processes(uids["alpha"]) == [], 10, "alpha's processes gone")
    assert folders_of(keter, "beta") != []  # beta's are its own, and it runs on
    served(private_nginx, "beta.test", "v1")


@pytest.mark.skipif(SETPRIV is None, reason="needs util-linux setpriv")
def test_with_root_in_tmp_an_app_keeps_the_machines_tmp_but_gets_a_tmpdir_of_its_own(
    open_base, keter_factory, private_nginx
):
    """ROOT in /tmp (here, and while trying keter out): a private /tmp would hide the
    app's own folders. keter says so at start; the app gets a TMPDIR of its own, which
    goes with it, umask 077, and /dev/shm and IPC of its own all the same."""
    keter = keter_factory(
        root=open_base / "root", **{"port-range": app_port_range(), "run-apps-as-root": False}
    )
    said = "apps keep the machine's /tmp and /var/tmp"
    wait_for(lambda: said in keter.log(), 10, "keter's line at start")
    host_file = Path(f"/tmp/keter-private-{secrets.token_hex(6)}.txt")
    try:
        seen = deploy(
            keter, open_base, "gamma", SECRET="gamma-key", HOST_FILE=str(host_file), SHM_MB="1"
        )
        served(private_nginx, "gamma.test", "v1")
        [folder] = folders_of(keter, "gamma")
        assert seen["tmpdir"] == str(folder / "tmp")
        assert (folder / "tmp" / "gamma-tmpdir.txt").read_text() == "gamma-key"
        assert seen["umask"] == "077" and seen["secret_mode"] == "600"
        assert host_file.stat().st_mode & 0o777 == 0o600  # no other user reads it
        assert not Path("/dev/shm/gamma-shm").exists()
        assert seen["ipc"] == [0, 0, 0]
        uid = json.loads((keter.root / "etc" / "app-users.json").read_text())["gamma"]
        assert sysv_objects({uid}) == []
        (keter.incoming / "gamma.keter").unlink()
        wait_for(lambda: folders_of(keter, "gamma") == [], 20, "gamma's folders removed")
    finally:
        host_file.unlink(missing_ok=True)
        Path("/var/tmp/gamma-var.txt").unlink(missing_ok=True)


def as_uid(uid: int, *command: str) -> str:
    assert SETPRIV is not None
    run = [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command]
    return subprocess.run(run, capture_output=True, text=True, check=True, timeout=30).stdout


@pytest.mark.skipif(SETPRIV is None, reason="needs util-linux setpriv")
def test_remove_ipc_removes_every_ipc_object_of_the_uid_and_no_other():
    """Where there are no namespaces, what an app's uid left in the machine's IPC goes
    when its last process stops (systemd's RemoveIPC): System V shared memory,
    semaphores and queues, and its files in /dev/shm."""
    gone, kept = 1_900_999_901, 1_900_999_902  # in keter's default range, unused here
    for option in ("-M4096", "-S1", "-Q"):
        as_uid(gone, "ipcmk", option)
    as_uid(kept, "ipcmk", "-M4096")
    name = f"keter-test-{secrets.token_hex(6)}"
    as_uid(gone, "touch", f"/dev/shm/{name}")
    assert sorted(option for option, _ in sysv_objects({gone})) == ["-m", "-q", "-s"]
    try:
        assert remove_ipc({gone}) == 4
        assert sysv_objects({gone}) == []
        assert not Path(f"/dev/shm/{name}").exists()
        assert [option for option, _ in sysv_objects({kept})] == ["-m"]
    finally:
        remove_ipc({gone})
        remove_ipc({kept})
    assert sysv_objects({kept}) == []


@pytest.mark.skipif(SETPRIV is None, reason="needs util-linux setpriv")
@pytest.mark.parametrize(
    ("kids", "end"), [(0, "removed"), (3, "removed"), (0, "keter stops")], ids=str
)
def test_without_namespaces_an_app_gets_a_tmpdir_and_its_ipc_goes_when_it_is_removed(
    open_base, keter_factory, private_nginx, kids, end
):
    """keter without CAP_SYS_ADMIN (a container, say) cannot give apps namespaces: it
    says so once at start and every deploy still works; each app process gets a TMPDIR
    of its own, and what its uid left in the machine's IPC and /dev/shm goes once the
    app's last process has stopped (systemd's RemoveIPC)."""
    assert SETPRIV is not None
    keter = keter_factory(
        root=open_base / "root",
        wrapper=(SETPRIV, "--bounding-set=-sys_admin", "--"),
        **{"port-range": app_port_range(), "run-apps-as-root": False},
    )
    said = "no private /tmp, /dev/shm or IPC for apps"
    wait_for(lambda: said in keter.log(), 10, "keter's line at start")
    try:
        # Children, as a pre-fork server has: orphaned as the app stops, they wait as
        # zombies for PID 1, which counted as the uid still running, and the objects
        # stayed. At keter's stop the leaders themselves were still zombies.
        seen = deploy(keter, open_base, "delta", SECRET="delta-key", SHM_MB="1", KIDS=str(kids))
        served(private_nginx, "delta.test", "v1")
        [folder] = folders_of(keter, "delta")
        assert seen["tmpdir"] == str(folder / "tmp")
        assert seen["umask"] == "077" and seen["secret_mode"] == "600"
        uid = json.loads((keter.root / "etc" / "app-users.json").read_text())["delta"]
        # The machine's, this time: what the app made is there while it runs.
        assert Path("/dev/shm/delta-shm").stat().st_uid == uid
        assert sorted(option for option, _ in sysv_objects({uid})) == ["-m", "-q", "-s"]
        if end == "keter stops":
            assert keter.stop() == 0
            assert "removed 4 IPC object(s) apps left (keter is shutting down)" in keter.log()
        else:
            (keter.incoming / "delta.keter").unlink()
            wait_for(lambda: folders_of(keter, "delta") == [], 20, "delta's folders removed")
            said = "delta: removed 4 IPC object(s)"
            wait_for(lambda: said in keter.log(), 10, "its IPC removed")
        assert sysv_objects({uid}) == []
        assert not Path("/dev/shm/delta-shm").exists()
    finally:  # what a failure left on the machine would fail the next run
        Path("/tmp/delta-secret.txt").unlink(missing_ok=True)
        Path("/var/tmp/delta-var.txt").unlink(missing_ok=True)
        Path("/dev/shm/delta-shm").unlink(missing_ok=True)
        if "uid" in locals():
            remove_ipc({uid})


@pytest.mark.parametrize("settings", [{}, {"setuid": "nobody"}], ids=["as root", "setuid"])
def test_an_app_of_a_shared_user_keeps_the_umask_that_lets_nginx_read_what_it_makes(
    open_base, keter_factory, private_nginx, settings
):
    # run-apps-as-root and setuid keep the old behaviour: files such an app (or its
    # release) makes for a static-files stanza, made 0600 by umask 077, were refused to
    # nginx's workers (www-data).
    keter = keter_factory(root=open_base / "root", **{"port-range": app_port_range(), **settings})
    # A name per case: ROOT in /tmp, so the app writes the machine's /tmp, and the two
    # cases may run at once (as different users).
    app = "shared" if settings else "rooted"
    try:
        seen = deploy(keter, open_base, app, SECRET=f"{app}-key")
        served(private_nginx, f"{app}.test", "v1")
        assert seen["umask"] == "022" and seen["secret_mode"] == "644"
    finally:
        Path(f"/tmp/{app}-secret.txt").unlink(missing_ok=True)
        Path(f"/var/tmp/{app}-var.txt").unlink(missing_ok=True)


MAIN_THREAD_ENDS = r"""
import ctypes, sys, threading, time
threading.Thread(target=time.sleep, args=(60,)).start()
print("ready", flush=True)
ctypes.CDLL(None).pthread_exit(None)  # the main thread ends; the process runs on
"""


@pytest.mark.skipif(SETPRIV is None, reason="needs util-linux setpriv")
def test_a_process_whose_main_thread_ended_still_runs_as_its_uid():
    # It shows as a zombie; counted as gone, its uid's IPC objects were removed under
    # the threads still using them.
    uid = 1_900_999_903  # in keter's default range, unused here
    assert SETPRIV is not None
    proc = subprocess.Popen(
        [
            SETPRIV,
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            SYSTEM_PYTHON,
            "-c",
            MAIN_THREAD_ENDS,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        wait_for(lambda: psutil.Process(proc.pid).status() == "zombie", 5, "the main thread's end")
        assert uid in running_uids()
    finally:
        proc.kill()
        proc.wait()


class HeldFs:
    """An ext4 file system on a loop device whose writes the test holds (``fsfreeze``):
    deleting a file in it waits until ``thaw``, as the deletion of an app's huge tree
    would take that long. ``hold(folder)`` mounts a folder of it, a file inside, there."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.held = 0

    def hold(self, folder: Path) -> None:
        self.held += 1
        inner = self.top / f"held-{self.held}"
        inner.mkdir()
        (inner / "left-by-the-app").write_text("x")
        subprocess.run(["mount", "--bind", str(inner), str(folder)], check=True)

    def freeze(self) -> None:
        subprocess.run(["fsfreeze", "--freeze", str(self.top)], check=True)

    def thaw(self) -> None:
        subprocess.run(["fsfreeze", "--unfreeze", str(self.top)], capture_output=True, check=False)

    def unmount_held(self) -> None:
        """Every mount of ``hold``, wherever keter renamed its folder to (lazily: a
        failed test's keter may still be deleting in one)."""
        for target in self._targets():
            if Path(target) != self.top:
                subprocess.run(["umount", "--lazy", target], check=True)

    def _targets(self) -> list[str]:
        lines = subprocess.run(
            ["findmnt", "-rn", "-o", "TARGET,SOURCE"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        mounts = [line.split() for line in lines]
        device = next(source for target, source in mounts if target == str(self.top))
        return [target for target, source in mounts if source.split("[")[0] == device]


@pytest.fixture
def held_fs(tmp_path) -> Iterator[HeldFs]:
    """A ``HeldFs``; thawed and unmounted afterwards. Requested after keter's fixtures,
    so that it is thawed before keter is stopped."""
    if not all(shutil.which(p) for p in ("mkfs.ext4", "fsfreeze", "findmnt")):
        pytest.skip("needs mkfs.ext4, fsfreeze and findmnt")
    image, top = tmp_path / "held.img", tmp_path / "held"
    top.mkdir()
    with image.open("wb") as sparse:
        sparse.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mounted = subprocess.run(
        ["mount", "-o", "loop", str(image), str(top)], capture_output=True, text=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a loop device here: {mounted.stderr.strip()}")
    fs = HeldFs(top)
    try:
        yield fs
    finally:
        fs.thaw()
        fs.unmount_held()
        subprocess.run(["umount", "--lazy", str(top)], check=True)


def test_removing_an_apps_tmp_delays_no_other_start_and_not_keters_stop(
    keter_factory, private_nginx, tmp_path, held_fs
):
    # A stopped process's /tmp was deleted in the spawn pool: four folders of an app
    # that left 200,000 files in each held its four threads, and another app's deploy
    # (and keter's stop) waited for rm -rf: for good here, as the file system is held.
    keter = keter_factory(**{"port-range": app_port_range()})
    keter.drop(make_bundle(tmp_path / "good.keter", config=webapp_config("good.test", "v1")))
    stanzas = [dict(webapp_config("tree.test", "t1"), type="webapp")]
    stanzas += [{"type": "background", "exec": "../bin/idle"} for _ in range(3)]
    idle = member("bin/idle", b"#!/bin/sh\nexec sleep 600\n", mode=0o755)
    keter.drop(make_bundle(tmp_path / "tree.keter", config={"stanzas": stanzas}, members=[idle]))
    served(private_nginx, "good.test", "v1")
    served(private_nginx, "tree.test", "t1")
    trees = wait_for(lambda: len(f := folders_of(keter, "tree")) == 4 and f, 10, "tree's /tmp")
    for folder in trees:
        held_fs.hold(folder / "tmp")
    held_fs.freeze()

    (keter.incoming / "tree.keter").unlink()
    wait_for(lambda: re.search(r"tree: deploy #\d+ stopped", keter.log()), 20, "tree's stop")
    keter.drop(make_bundle(tmp_path / "good.keter", config=webapp_config("good.test", "v2")))
    served(private_nginx, "good.test", "v2", timeout=10)
    run_tmp = keter.root / "run" / "tmp"
    assert folders_of(keter, "tree") == []  # renamed away at once, their deletion held
    assert len(list(run_tmp.glob(".old-tree-*"))) == 4

    keter.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "keter: stopped" in keter.log_since_start(), 15, "keter's stop")
    assert "keter stops before its clean-up is done (tree: removing" in keter.log_since_start()
    # Its process ends once the file system is thawed (a held write is not killable);
    # what it could not delete goes at the next start.
    held_fs.thaw()
    assert keter.proc.wait(10) == 0
    held_fs.unmount_held()
    keter.start()
    wait_for(lambda: not list(run_tmp.glob(".old-*")), 10, "the leftovers swept")
    served(private_nginx, "good.test", "v2")


def test_a_slow_clean_up_is_said_with_its_app_and_how_long_it_took(tmp_path, caplog):
    # An app's /tmp that took seconds to delete was deleted in silence; a clean-up that
    # failed was kept by the pool to itself. Here every clean-up counts as slow.
    reaper = Reaper(slow=0.0)
    tree = tmp_path / "tree"
    (tree / "deep").mkdir(parents=True)
    (tree / "deep" / "file").write_text("x")
    reaper.submit("tree: removing what process tree-4 left", lambda: Private.remove_swept([tree]))
    reaper.submit("tree: removing its IPC objects", lambda: 1 / 0)
    reaper.submit("tree: after a failure", lambda: None)
    with caplog.at_level(logging.INFO, logger="keter.processes.reaper"):
        reaper.close(timeout=10)
    said = [record.getMessage() for record in caplog.records]
    assert re.fullmatch(r"tree: removing what process tree-4 left took \d+\.\ds", said[0]), said
    assert said[1] == "tree: removing its IPC objects failed", said
    assert caplog.records[1].exc_info is not None  # with its traceback
    assert said[2].startswith("tree: removing its IPC objects took"), said
    assert said[3].startswith("tree: after a failure took"), said
    assert not tree.exists()
