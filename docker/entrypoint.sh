#!/bin/sh
# Container entrypoint of softprompt-server (installed as /usr/local/bin/docker-entrypoint.sh).
#
#   docker run IMAGE                      -> softprompt-server
#   docker run IMAGE --flag value ...     -> softprompt-server --flag value ...
#   docker run IMAGE bash                 -> bash (any first argument not starting with "-")
#
# Settings come from SOFTPROMPT_* variables or flags; the server reads both itself, so nothing is
# translated here. This script only creates the adapter store (SOFTPROMPT_ADAPTER_DIR, or the
# --adapter-dir flag) when it is missing, then execs the server: the server replaces this shell
# as PID 1 and receives docker stop's SIGTERM itself, for a graceful shutdown.
#
# SOFTPROMPT_SERVER_CMD replaces the server command, split on whitespace (no quoting), e.g.
# "python -m server"; the default is the installed console script `softprompt-server`.
set -eu

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

adapter_dir=${SOFTPROMPT_ADAPTER_DIR:-}
previous=
for arg in "$@"; do
    case $previous in
        --adapter-dir) adapter_dir=$arg ;;
    esac
    case $arg in
        --adapter-dir=*) adapter_dir=${arg#--adapter-dir=} ;;
    esac
    previous=$arg
done

if [ -n "$adapter_dir" ]; then
    if ! mkdir -p -- "$adapter_dir"; then
        echo "docker-entrypoint: cannot create the adapter directory $adapter_dir (running as uid $(id -u))" >&2
        exit 1
    fi
    if [ ! -w "$adapter_dir" ]; then
        echo "docker-entrypoint: warning: $adapter_dir is not writable by uid $(id -u); adapter uploads will fail" >&2
    fi
fi

set -f  # split SOFTPROMPT_SERVER_CMD on whitespace without expanding globs
# shellcheck disable=SC2086
exec ${SOFTPROMPT_SERVER_CMD:-softprompt-server} "$@"
