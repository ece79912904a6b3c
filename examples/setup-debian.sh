#!/usr/bin/env bash
# Set up keter on a fresh Debian machine and run it on ROOT (default /opt/keter):
#   sudo ./examples/setup-debian.sh /opt/keter
# Installs nginx, nftables, PostgreSQL and Python (with psycopg, for examples/pgtest) from Debian, keter into /usr/local/lib/keter
# (a virtualenv, linked as /usr/local/bin/keter), removes Debian's default nginx site
# (it would shadow keter's 404 for unknown hosts), then starts keter: as the systemd
# service when systemd runs (`journalctl -u keter` shows what it does), else in the
# foreground.
set -euo pipefail
root=${1:-/opt/keter}
# It goes into the systemd unit's ExecStart= and ReadWritePaths= as it is.
[[ "$root" =~ ^/[A-Za-z0-9._/-]+$ ]] || {
    echo "ROOT must be an absolute path of letters, digits and . _ / - (got: $root)" >&2
    exit 1
}
src=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "run as root (sudo)" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# procps: keter.service reloads keter with /bin/kill. nftables: keter switches versions in
# the kernel (see README, "Zero-downtime switch").
apt-get install -y -qq --no-install-recommends nginx nftables postgresql procps python3 python3-venv python3-psycopg >/dev/null

python3 -m venv /usr/local/lib/keter
/usr/local/lib/keter/bin/pip install -q --disable-pip-version-check "$src"
ln -sf /usr/local/lib/keter/bin/keter /usr/local/bin/keter
install -D -m 644 "$src/README.md" /usr/local/share/doc/keter/README.md

rm -f /etc/nginx/sites-enabled/default
mkdir -p "$root/incoming" /etc/nginx/sites-enabled
# An old worker ends a minute after a reload even when a request is held open (README,
# "HTTP features"); without this it lives, with its copy of the config, until that ends.
if ! grep -q '^[[:space:]]*worker_shutdown_timeout' /etc/nginx/nginx.conf; then
    sed -i '/^worker_processes/a worker_shutdown_timeout 1m;' /etc/nginx/nginx.conf
fi

if [ -d /run/systemd/system ]; then
    sed "s|/opt/keter|$root|g" "$src/keter.service" > /etc/systemd/system/keter.service
    systemctl daemon-reload
    systemctl enable --now nginx postgresql
    systemctl enable --now keter
    systemctl restart keter
    echo "keter is running on $root: copy bundles into $root/incoming/; logs: journalctl -u keter"
else
    # No systemd (e.g. a container): start the services by hand, keter in the foreground.
    # The system nginx, by its pid file (other nginx instances may run on this machine).
    if ! { [ -s /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; }; then nginx; fi
    pg_lsclusters -h | while read -r version name _port status _rest; do
        if [ "$status" = down ]; then pg_ctlcluster "$version" "$name" start; fi
    done
    exec /usr/local/bin/keter "$root"
fi
