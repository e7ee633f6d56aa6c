#!/usr/bin/env bash
# One command for every end-to-end figure in bench/RESULTS.md:
#   bench/run.sh                      # all sections, about 6-8 minutes
#   E2E_SECTIONS=throughput bench/run.sh
# Sizes: E2E_MESSAGES (5000), E2E_ROUNDS (3), E2E_CONNECTIONS (10000).
# Needs root (a private Postfix instance); installs what is missing with apt.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v postfix >/dev/null 2>&1 || need+=(postfix)
command -v smtp-source >/dev/null 2>&1 || need+=(postfix)
command -v perf >/dev/null 2>&1 || need+=(linux-perf)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Postfix's installer asks what kind of site this is: none (we run private instances).
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null || true
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) \
        || echo "warning: could not install ${need[*]}; the sections needing them are skipped"
fi

# 10,000 sessions need 10,000 descriptors in the harness and in the node.
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -ge 65536 ]; then ulimit -n 65536; else ulimit -n "$hard"; fi
echo "open files: $(ulimit -n)"

cargo build --release --bin magicmx
exec cargo bench --bench e2e -- "$@"
