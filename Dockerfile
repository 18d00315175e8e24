# One image for the three services (compose.yaml picks the command), with the demo model inside.
#
#   docker build -t gemma3-serve:cpu .
#   docker build -t gemma3-serve:cuda --build-arg VARIANT=cuda .   # JAX's CUDA 12 wheels (pyproject extra `cuda`)
#   docker run --rm -p 50051:50051 gemma3-serve:cpu gemma3-gateway ...
#
# VARIANT picks JAX's build: cpu (default), cuda or tpu, the optional extras of pyproject.toml.

ARG PYTHON_VERSION=3.11

# --- builder: a virtual environment with the project and its runtime dependencies only ----------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS builder
ARG VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src

# Dependencies first, from pyproject.toml alone, so that a code change does not reinstall JAX.
COPY pyproject.toml README.md ./
RUN python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
extra = p["optional-dependencies"][sys.argv[1]] if sys.argv[1] in ("cuda", "tpu") else []; \
sys.argv[1] in ("cpu", "cuda", "tpu") or sys.exit("VARIANT must be cpu, cuda or tpu"); \
print("\n".join(p["dependencies"] + extra))' "$VARIANT" > /tmp/requirements.txt \
    && /opt/venv/bin/pip install -r /tmp/requirements.txt

# The gRPC stubs (gemma3serve/) are generated here from the .proto files, with the grpcio-tools pinned in
# the test extra, installed outside the venv so that it stays out of the runtime image.
COPY protos/ protos/
RUN spec=$(python -c 'import tomllib; print(next(d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"] if d.startswith("grpcio-tools")))') \
    && python -m pip install "$spec" \
    && python protos/generate.py

COPY gemma3/ gemma3/
COPY serving/ serving/
COPY lm_worker/ lm_worker/
COPY vision_worker/ vision_worker/
COPY gateway/ gateway/
COPY launcher/ launcher/
COPY demo/ demo/
# The model's files are made readable by the runtime user, whatever their modes in the build context
# (a freshly written model.safetensors can be 0600).
RUN /opt/venv/bin/pip install --no-deps . \
    && /opt/venv/bin/python -c "import gemma3, gemma3serve.v1, serving, lm_worker, vision_worker, gateway" \
    && chmod -R a+rX demo/model

# --- runtime: slim Python, the venv, the demo model, a user without privileges ------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="gemma3-serve" \
      org.opencontainers.image.description="Gemma 3 multimodal serving on JAX/Flax NNX, as gRPC microservices" \
      org.opencontainers.image.licenses="Apache-2.0" \
      gemma3-serve.variant="${VARIANT}"
# The CPU image carries g++: gemma3/cpu_kernels.py compiles its decode product kernel for the host's own CPU
# on first use (about 5 s, cached under ~/.cache/gemma3-serve/kernels); without it products use XLA's dot.
RUN if [ "$VARIANT" = cpu ]; then apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*; fi
RUN useradd --create-home --uid 10001 --user-group gemma3 \
    && install -d -o gemma3 -g gemma3 /home/gemma3/.cache /home/gemma3/.cache/xla  # the xla-cache volume's owner
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /src/demo/model /models/demo
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GEMMA3_MODEL=/models/demo
USER gemma3
WORKDIR /home/gemma3
EXPOSE 50051 50052 50053
# No ENTRYPOINT: the command is the console script of the service (gemma3-gateway, gemma3-lm-worker,
# gemma3-vision-worker, gemma3-client); compose.yaml sets it for each service.
CMD ["gemma3-gateway", "--help"]
