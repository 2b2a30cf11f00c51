# optserve API server. Build: docker build -t optserve .
# Run with Redis: docker compose up (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY clients ./clients
COPY wire ./wire
RUN pip install --no-cache-dir ".[server]" \
    && useradd --system --uid 10001 optserve
USER optserve

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"

# Every setting can also come from OPTSERVE_* variables (service/config.py).
CMD ["optserve", "serve"]
