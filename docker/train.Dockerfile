# qi training image: `docker build -f docker/train.Dockerfile -t qi .` from the repository root,
# then `docker run --rm -v qi-data:/data qi train` (or `qi train --data-dir /data/images`).
# The serving and tracking-server images come with the registry and serving work.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git libgomp1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/qi
COPY pyproject.toml README.md MLproject conda.yaml ./
COPY qi ./qi
RUN pip install --no-cache-dir .
ENV MLFLOW_TRACKING_URI=sqlite:////data/mlflow.db \
    QI_CACHE_DIR=/data/cache \
    MPLBACKEND=Agg
VOLUME /data
WORKDIR /data
ENTRYPOINT ["qi"]
CMD ["train", "--no-progress"]
