#!/usr/bin/env bash
# Debian packages the test suite and tools need, installed only when missing (root: apt-get;
# otherwise a message naming the packages).
#   libb64-0d     - perf_analyzer (from tritonclient 2.51) links libb64.so.0d
#   redis-server  - the streaming tests run a real Redis on a loopback port
#   haproxy       - the fleet test and bench put three servers behind a real load balancer
#   prometheus    - promtool checks the recording and alerting rules under deploy/observability;
#                   the server scrapes replicas in the rollout fleet test
#   chromium, chromium-driver - the console test drives a real headless browser (selenium)
set -euo pipefail
need=()
ldconfig -p 2>/dev/null | grep -q 'libb64.so.0d' || need+=(libb64-0d)
command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || need+=(redis-server)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
{ command -v promtool && command -v prometheus; } >/dev/null || need+=(prometheus)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages: ${need[*]} (run: sudo apt-get install -y ${need[*]})" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${need[@]}" >/dev/null 2>&1 || {
  apt-get update -q >/dev/null
  apt-get install -y -q "${need[@]}" >/dev/null
}
echo "installed: ${need[*]}"
