#!/usr/bin/env bash
# Three RabbitMQ nodes on this host, clustered, for a lab on a cluster (README: "A lab on a
# RabbitMQ cluster"). A thin wrapper of `smslab broker cluster`.
#
#   scripts/local-cluster.sh up [DIR] [NODES]   start them; the last line is their AMQP URLs,
#                                               comma-separated, ready for --amqp
#   scripts/local-cluster.sh status [DIR]       the nodes, their pids and URLs
#   scripts/local-cluster.sh down [DIR]         stop them and remove DIR
#
# DIR defaults to ./.smslab-cluster, NODES to 3. Needs RabbitMQ installed (not running).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${here}${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-python3}"
verb="${1:-}"
dir="${2:-.smslab-cluster}"
case "$verb" in
  up) exec "$python" -m emulator broker cluster up --dir "$dir" --nodes "${3:-3}" ;;
  down|status) exec "$python" -m emulator broker cluster "$verb" --dir "$dir" ;;
  *) echo "usage: $0 up|down|status [DIR] [NODES]" >&2; exit 2 ;;
esac
