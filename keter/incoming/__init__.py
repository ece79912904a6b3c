"""From a file appearing in ``ROOT/incoming/`` to an unpacked folder with a parsed config.

- ``files``: what a file in incoming/ must be before keter reads it (a regular
  file, opened non-blocking, never through a link);
- ``gzipcheck``: is a bundle completely written? (bounded, one slice at a time);
- ``watcher``: the actor that turns inotify events into ``BundleArrived`` /
  ``BundleRemoved`` / ``BundleIgnored``;
- ``unpack``: ``safe_unpack``, the pure, streaming, capped extraction;
- ``worker``: the process of keter's own that runs it, and keter's end of it;
- ``unpacker``: the actor that unpacks (through the worker) and parses one bundle
  per message.
"""
