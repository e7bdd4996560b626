#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine, then runs it.
#   bash tests/run.sh [pytest args...]
# venv + packages, the Kafka broker jars (Maven Central), and the Debian
# packages prometheus (promtool) and kcat when running as root.
# STREAM_REQUIRE_KAFKA=1 turns a skipped Kafka/Prometheus test into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v kcat >/dev/null 2>&1 || need_apt+=(kcat)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests/run.sh: installing ${need_apt[*]} (Debian packages)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "tests/run.sh: ${need_apt[*]} missing and not root: tests needing them will skip" >&2
  fi
fi
# Prometheus tests start their own server; the Debian service must not hold the ports.
if command -v systemctl >/dev/null 2>&1; then systemctl stop prometheus >/dev/null 2>&1 || true; fi

# Resolve the Kafka broker jars once (cached in .kafka-jars/, gitignored).
.venv/bin/python -c 'import sys; sys.path.insert(0, "tests"); import kafka_broker; print("kafka jars:", kafka_broker.resolve_jars())' \
  || { [ "${STREAM_REQUIRE_KAFKA:-}" = 1 ] && exit 1; echo "tests/run.sh: Kafka jars unavailable; Kafka tests will skip" >&2; }

set +e
.venv/bin/python -m pytest "$@"
code=$?
set -e
if [ $code -eq 5 ]; then
  echo "tests/run.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit $code
