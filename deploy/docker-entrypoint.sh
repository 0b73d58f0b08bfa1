#!/bin/sh
# Start-up of every billing-worker container (worker, beat, Flower, CLI).
#
# prometheus_client's multiprocess mode keeps one file per process in PROMETHEUS_MULTIPROC_DIR;
# files left by a previous run of this container would be summed into the new one's metrics, so
# the directory is emptied here, before any Python process starts.
set -eu
if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    find "$PROMETHEUS_MULTIPROC_DIR" -mindepth 1 -maxdepth 1 -name '*.db' -delete
fi
exec "$@"
