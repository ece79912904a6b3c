import sys
from pathlib import Path

# The tests import their helpers (support, nginx_server, pg_server) as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))
from keter_daemon import keter, keter_factory  # noqa: F401  (a real keter daemon)
from nginx_server import private_nginx  # noqa: F401
from pg_server import private_postgres  # noqa: F401  (the private PostgreSQL fixture)
