#!/bin/sh
# The benchmarks' app (bin/app in every bundle): nginx as one single process.
#
# It starts in a few milliseconds and serves tens of thousands of requests a
# second, so the figures measure keter and not the app. It answers every
# request with "VERSION FOLDER PID": FOLDER (keter's temp/NAME-ID) tells one
# deploy from the next even when the bundle is the same file, and PID tells a
# restarted process from the one that crashed.
#
# With CRASH_AFTER=SECONDS it is killed by SIGKILL that long after each start:
# a crash loop that always gets healthy first.
set -eu
here=$PWD
# Written with the shell's own printf: no process but the app's (nginx makes tmp/
# itself). cat and mkdir here took 1.8 ms of CPU per start, a quarter of it, which a
# drop of 1000 apps paid 1000 times.
printf '%s\n' \
    'daemon off;' \
    'master_process off;' \
    "pid $here/app.pid;" \
    'events { worker_connections 1024; }' \
    'http {' \
    '    access_log off;' \
    "    client_body_temp_path $here/tmp;" \
    "    proxy_temp_path $here/tmp;" \
    "    fastcgi_temp_path $here/tmp;" \
    "    uwsgi_temp_path $here/tmp;" \
    "    scgi_temp_path $here/tmp;" \
    '    server {' \
    "        listen 127.0.0.1:$PORT;" \
    '        default_type text/plain;' \
    "        location / { return 200 \"${VERSION:-v0} ${here##*/} \$pid\\n\"; }" \
    '    }' \
    '}' >app.conf
if [ -n "${CRASH_AFTER:-}" ]; then
    # $$ is this shell's pid, which nginx inherits through exec below.
    (sleep "$CRASH_AFTER"; kill -9 $$) >/dev/null 2>&1 &
fi
exec /usr/sbin/nginx -p "$here" -c "$here/app.conf" -e stderr
