# syntax=docker/dockerfile:1
# `mlflow server` with its PostgreSQL driver (psycopg 3) and the S3 client for MinIO artifacts; the
# official image carries neither. Build from the repository root:
#   docker build -f infra/docker/mlflow.Dockerfile -t llmops-mlflow:3.17.2 .
FROM ghcr.io/mlflow/mlflow:v3.17.2
ENV MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
RUN pip install --no-cache-dir "psycopg[binary]>=3.2" "boto3>=1.34"
