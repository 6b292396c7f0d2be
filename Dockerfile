# Image for the dataflow and API services of docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY dataflows dataflows
COPY serving serving
COPY schemas schemas
RUN pip install --no-cache-dir .
ENV PYTHONUNBUFFERED=1
EXPOSE 8000
CMD ["insightflow", "api", "--host", "0.0.0.0", "--port", "8000"]
