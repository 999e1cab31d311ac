FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 fonts-dejavu-core \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 app
WORKDIR /srv/app
COPY pyproject.toml README.md ./
COPY app app
COPY services services
COPY routers routers
COPY models models
COPY templates templates
# Editable, so that templates/ stays beside the code that loads it.
RUN pip install --no-cache-dir -e .

USER app
ENV RECEIPTS_DIR=/srv/data/receipts PORT=8000
EXPOSE 8000
HEALTHCHECK CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)" || exit 1
# `payments serve`, not bare uvicorn: it hands uvicorn the proxies FORWARDED_ALLOW_IPS lists
# (uvicorn alone would also believe X-Forwarded-For from any loopback peer). PORT is a setting.
CMD ["payments", "serve", "--host", "0.0.0.0"]
