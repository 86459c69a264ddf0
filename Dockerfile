FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY worker ./worker
COPY models ./models
COPY migrations ./migrations
RUN pip install --no-cache-dir . && useradd --system kling && mkdir -p /app/.kling && chown kling /app/.kling
USER kling
ENV KLING_HOME=/app/.kling
CMD ["celery", "-A", "worker", "worker", "--loglevel=INFO"]
