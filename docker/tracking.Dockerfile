# An MLflow tracking server and model registry for a team: PostgreSQL backend store, artifacts
# on a volume served through the server (--serve-artifacts), HTTP basic auth when
# MLFLOW_APP_NAME=basic-auth (compose.tracking.yaml sets it). The test suite runs this CMD.
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow[auth]>=3.17,<4" "psycopg2-binary>=2.9"
ENV HOST=0.0.0.0 PORT=5000 WORKERS=2 MLFLOW_ARTIFACTS_DESTINATION=/mlartifacts \
    MLFLOW_APP_NAME="" MLFLOW_ALLOWED_HOSTS=""
EXPOSE 5000
CMD ["sh", "-c", "exec mlflow server --host \"$HOST\" --port \"$PORT\" --backend-store-uri \"$MLFLOW_BACKEND_STORE_URI\" --artifacts-destination \"$MLFLOW_ARTIFACTS_DESTINATION\" --serve-artifacts --workers \"$WORKERS\" ${MLFLOW_APP_NAME:+--app-name \"$MLFLOW_APP_NAME\"} ${MLFLOW_ALLOWED_HOSTS:+--allowed-hosts \"$MLFLOW_ALLOWED_HOSTS\"}"]
