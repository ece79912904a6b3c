"""Traffic statistics and access logs (issue 14): what real users get from each app.

nginx logs every request of an app, with the app's name and version, to one
spool file of keter's (``record``: the line format, shared with the nginx
renderer; ``spool``: reading it and giving its space back). The stats
component (``component``) counts each request per app and version
(``traffic``: rolling windows of 10-second slots with a streaming latency
``histogram``, memory bounded whatever the traffic), writes the app's access
log, reports to the status component every second and watches newly
deployed versions for the supervisor.

No module is imported here: the renderer imports ``record`` and ``spool``
alone.
"""
