FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 fonts-dejavu-core \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 app
WORKDIR /srv/app
# The dependencies first, in a layer of their own: it is rebuilt only when pyproject.toml
# changes, and a change to the code reuses it from the cache (instead of reinstalling some 70
# packages). They are read from [project].dependencies, the one list of them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
COPY app app
COPY services services
COPY routers routers
COPY models models
COPY templates templates
# Then the project alone, its dependencies already there. Editable, so that templates/ stays
# beside the code that loads it.
RUN pip install --no-cache-dir --no-deps -e .
# A named volume mounted here takes this directory's owner when Docker first creates it: the
# app user's, so that receipts can be written.
RUN mkdir -p /srv/data/receipts && chown -R app:app /srv/data

USER app
# Production unless told otherwise: the service then refuses to start without a real
# JWT_SECRET_KEY, a real provider and verifiable webhooks. WEB_CONCURRENCY is the worker count.
ENV ENVIRONMENT=production RECEIPTS_DIR=/srv/data/receipts PORT=8000 WEB_CONCURRENCY=2
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=2)"]
# Exec form, no shell in between: `payments serve` is PID 1, or the only child of the init that
# `docker run --init` and compose's `init: true` put there, so SIGTERM reaches uvicorn, which
# stops gracefully (in under a second). Prefer the init: Python as PID 1 reaps no orphans (the
# receipt renderers of a worker that died). It hands uvicorn the proxies FORWARDED_ALLOW_IPS
# lists (uvicorn alone would also believe X-Forwarded-For from any loopback peer). PORT and
# WEB_CONCURRENCY are read.
CMD ["payments", "serve", "--host", "0.0.0.0"]
