# Custom SDK container for Dataflow workers (--sdk_container_image): this project and one install extra
# preinstalled, so a worker starts without pip-installing torch (~2 GB with its CUDA libraries) at boot.
#
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/yt8m-cma:tagging .                          # RunInference
#   docker build --build-arg EXTRA=preprocess -t REGION-docker.pkg.dev/PROJECT/REPO/yt8m-cma:preprocess .
#   docker push REGION-docker.pkg.dev/PROJECT/REPO/yt8m-cma:tagging
#   python -m beam_jobs.tag_segments ... --runner=DataflowRunner --experiments=use_runner_v2 \
#       --sdk_container_image=REGION-docker.pkg.dev/PROJECT/REPO/yt8m-cma:tagging
#
# The base image must carry the Beam version and Python minor version of the machine that launches the job
# (the defaults below were .venv's when last edited); pass them from the launching environment:
#   --build-arg BEAM_VERSION=$(python -c "import apache_beam; print(apache_beam.__version__)")
# The base image's ENTRYPOINT (/opt/apache/beam/boot, the SDK harness boot program) is kept: this file sets none.
#
# CPU-only tagging workers can take torch's CPU wheels (a much smaller image):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t ...:tagging-cpu .
ARG PYTHON_VERSION=3.11
ARG BEAM_VERSION=2.78.0
FROM apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION}

# preprocess (Beam only) or tagging (Beam + torch); see setup.cfg [options.extras_require]
ARG EXTRA=tagging
ARG BEAM_VERSION
# an extra package index for torch (e.g. its CPU-only wheels); empty: PyPI's default (CUDA) wheels
ARG TORCH_INDEX_URL=

# Only what the package build reads (.dockerignore keeps the rest of the tree out of the build context).
COPY setup.py setup.cfg README.md /opt/yt8m-cma/
COPY pipeline /opt/yt8m-cma/pipeline
COPY beam_jobs /opt/yt8m-cma/beam_jobs
COPY model /opt/yt8m-cma/model

# A regular (not editable) install into the image's Python, with apache-beam held at the base image's version so
# the extra's "apache-beam[gcp]" requirement never swaps the SDK under the boot program; then check that the
# result is consistent and that the job's worker-side modules import.
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "${TORCH_INDEX_URL}"} \
        "/opt/yt8m-cma[${EXTRA}]" "apache-beam[gcp]==${BEAM_VERSION}" \
    && pip check \
    && if [ "${EXTRA}" = "tagging" ]; then python -c "import beam_jobs.tag_segments, model.evaluate"; \
       else python -c "import beam_jobs.preprocess"; fi \
    && rm -rf /opt/yt8m-cma
