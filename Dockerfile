# cco-exporter in a container. From the repository root:
#   docker build -t cco-exporter .
#   docker run -d -p 127.0.0.1:9469:9469 -v cco-data:/data cco-exporter
# deploy/docker-compose.yml runs it with Prometheus, Grafana and an OpenTelemetry collector;
# docs/DEPLOY.md has the details.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Time zone data, so that budget_timezone (CCO_EXPORTER_BUDGET_TIMEZONE) or TZ may name any IANA
# zone; the container's own zone stays UTC. Slim images of newer Debian releases leave it out.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tzdata \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first, in a layer of their own, so that changing the code does not reinstall them:
# the list is read from pyproject.toml, the one place it is written.
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The migrations are read from the repository's migrations/ directory, found from the package's
# own location (exporter/store/db.py: MIGRATIONS_DIR = <package>/../migrations). A regular
# install would copy the package into site-packages, away from them; an editable install of
# /app imports it from /app/exporter, so /app/migrations is found.
COPY README.md ./
COPY migrations/ migrations/
COPY exporter/ exporter/
RUN pip install --no-deps -e /app \
    && python -c "from exporter.store.db import MIGRATIONS_DIR; assert (MIGRATIONS_DIR / '001_initial_schema.sql').is_file(), MIGRATIONS_DIR"

# Not root. The database lives in the /data volume; a bind-mounted host directory must be
# writable by uid 10001.
RUN useradd --system --uid 10001 --user-group --create-home --shell /usr/sbin/nologin cco \
    && mkdir /data \
    && chown cco:cco /data
USER cco
VOLUME ["/data"]

# Listen on every interface of the container (the exporter binds 127.0.0.1 by default); publish
# the port on the host's loopback (-p 127.0.0.1:9469:9469) unless other machines must reach it,
# and then set CCO_EXPORTER_TOKEN.
ENV CCO_EXPORTER_HOST=0.0.0.0 \
    CCO_EXPORTER_PORT=9469 \
    CCO_EXPORTER_DB=/data/metrics.db
EXPOSE 9469

# No curl in the slim image: Python asks /api/metrics/health, with the token when reads need one.
# The check fails only when the exporter does not answer; a "degraded" answer (SQLite refusing
# writes, events spilled to a file) is still healthy, since a restart would not help.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; t = os.environ.get('CCO_EXPORTER_TOKEN'); r.urlopen(r.Request('http://127.0.0.1:' + os.environ.get('CCO_EXPORTER_PORT', '9469') + '/api/metrics/health', headers={'Authorization': 'Bearer ' + t} if t else {}), timeout=4)"]

# SIGTERM (docker stop) commits every accepted event, then exits 0; allow it some seconds
# (docker stop -t 30, or stop_grace_period in compose).
CMD ["cco-exporter", "serve"]
