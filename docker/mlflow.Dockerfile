# The MLflow tracking server of docker/compose.yaml: basic-auth (mlflow[auth]), Postgres
# (psycopg) and S3 artifacts (boto3). Also runs the one-shot `buckets` service.
FROM python:3.11-slim
# Kept equal to the mlflow pin in pyproject.toml (tests/test_stack_compose.py checks it).
ARG MLFLOW_VERSION=3.17.2
ENV PIP_NO_CACHE_DIR=1
RUN pip install "mlflow[auth]==${MLFLOW_VERSION}" "psycopg[binary]>=3.1" "boto3>=1.34"
COPY mlflow-auth.ini stack.py /opt/llmrec/
