"""Fault injection for tests: put this folder on a keter daemon's PYTHONPATH.

``KETER_TEST_FAULT=COMPONENT`` (e.g. ``unpacker``) makes that component's
handler raise for every message about an app whose name starts with ``boom``,
as a bug in keter would. Nothing in keter itself knows about this: Python
imports ``sitecustomize`` at start-up, and the patch wraps the component's
handler when its thread starts.
"""

from __future__ import annotations

import os

_TARGET = os.environ.get("KETER_TEST_FAULT")

if _TARGET:
    from keter import actor

    _start = actor.Actor.start

    def start(self) -> None:
        if self.component == _TARGET and "handle" not in vars(self):
            handle = self.handle

            def faulty(message: object) -> None:
                if str(getattr(message, "app", "")).startswith("boom"):
                    raise RuntimeError(f"injected fault in {self.component}")
                handle(message)

            self.handle = faulty
        _start(self)

    actor.Actor.start = start
