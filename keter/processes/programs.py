"""The system programs an app's start runs as root, found once on the system's own
``PATH``: never on the app's (its environment is the bundle's) nor keter's (whoever
set up keter's service may have put a folder of theirs first). None where missing:
the caller says what it does without."""

from __future__ import annotations

import shutil

SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
SHELL = "/bin/sh"
SETPRIV = shutil.which("setpriv", path=SYSTEM_PATH)  # drops to the app's user
UNSHARE = shutil.which("unshare", path=SYSTEM_PATH)  # the app's own namespaces
MOUNT = shutil.which("mount", path=SYSTEM_PATH)  # its private /tmp, /var/tmp, /dev/shm
IPCRM = shutil.which("ipcrm", path=SYSTEM_PATH)  # RemoveIPC without namespaces
