# Sourced by every RUN that calls pip in the images (`. /usr/local/lib/so8t/pip-env.sh && pip install ...`):
# - the CA bundle pip must trust, when the build passes it as the BuildKit secret `pip_cert` (docker/compose.cpu.yaml
#   does, from the host's pip settings); it is mounted for that RUN only and never stored in a layer;
# - the wheelhouse (/wheelhouse, the build context's .wheelhouse/, bind-mounted read-only) as extra local links.
if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi
if [ -d /wheelhouse/wheels ]; then export PIP_FIND_LINKS=/wheelhouse/wheels; fi
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
