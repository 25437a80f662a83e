#!/usr/bin/env bash
# `ray up clusters/local.yaml` against this machine itself over SSH, a short sequence on the cluster
# it made (one `mmcl run` on the head, one through the Ray Jobs API), then `ray down`.
#   sudo benchmarks/ray_up_local.sh 2>&1 | tee results/ray_up_local.log
# The cluster runs in Ray's token mode, as README's cluster section sets it up: the caller's
# ~/.ray/auth_token (made if missing) goes to the node, and the job is submitted with that token.
# Needs root and Debian's openssh-server and rsync (`apt-get install openssh-server rsync`). It adds
# an unprivileged user (mmcl-up) with a key made for the run and starts sshd on 127.0.0.1:22; at the
# end it stops what it started, by PID, and removes the user. The node runs as that user, so the
# `ray stop` in the start and down commands cannot touch anyone else's Ray.
set -euo pipefail
exec > >(sed -u 's/\x1b\[[0-9;]*m//g') 2>&1  # Ray's colours out of the record
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RAY=$ROOT/.venv/bin/ray
NODE_USER=mmcl-up
# Not Ray's defaults (8265, 52365), which a Ray already running on this machine may hold.
DASHBOARD_PORT=${DASHBOARD_PORT:-8266}
AGENT_PORT=${AGENT_PORT:-52366}
WORK=$(mktemp -d /tmp/ray-up-XXXX)
CLUSTER=$WORK/local.yaml
SSHD_PID=

cleanup() {
  set +e
  [ -f "$CLUSTER" ] && "$RAY" down -y "$CLUSTER" >/dev/null 2>&1
  [ -n "$SSHD_PID" ] && kill "$SSHD_PID"
  if id "$NODE_USER" >/dev/null 2>&1; then
    pkill -KILL -u "$NODE_USER"; sleep 1  # the user's own processes, if `ray down` left any
    userdel -r "$NODE_USER" 2>/dev/null
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== $(date -u +%FT%TZ) on $(nproc) CPUs, $(. /etc/os-release; echo "$PRETTY_NAME"), $("$RAY" --version)"
id "$NODE_USER" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$NODE_USER"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/id_ed25519"
install -d -m 700 -o "$NODE_USER" -g "$NODE_USER" "/home/$NODE_USER/.ssh"
install -m 600 -o "$NODE_USER" -g "$NODE_USER" "$WORK/id_ed25519.pub" "/home/$NODE_USER/.ssh/authorized_keys"
# Only because this machine has another user's Ray: Ray Train's lock files go to $RAY_TMPDIR/_ray_lockfiles,
# and /tmp/_ray_lockfiles belongs to that user. ray up's commands source ~/.bashrc.
install -d -o "$NODE_USER" -g "$NODE_USER" "/home/$NODE_USER/tmp"
echo 'export RAY_TMPDIR=$HOME/tmp' >> "/home/$NODE_USER/.bashrc"
"$RAY" get-auth-token --generate >/dev/null  # prints the token: kept out of the record
mkdir -p /run/sshd
/usr/sbin/sshd -D -o ListenAddress=127.0.0.1 -o PasswordAuthentication=no &
SSHD_PID=$!
sleep 1

# clusters/local.yaml with this machine's address as the head, no workers, and this run's user and key.
# Setup: `make install` without `cpu-torch`, since this machine reaches PyPI but not download.pytorch.org.
"$ROOT/.venv/bin/python" - "$ROOT/clusters/local.yaml" "$CLUSTER" "$NODE_USER" "$WORK/id_ed25519" \
  "--dashboard-port=$DASHBOARD_PORT --dashboard-agent-listen-port=$AGENT_PORT" <<'EOF'
import sys, yaml
src, dst, user, key, ports = sys.argv[1:]
cfg = yaml.safe_load(open(src))
cfg["provider"].update(head_ip="127.0.0.1", worker_ips=[])
cfg["min_workers"] = cfg["max_workers"] = 0
cfg["auth"] = {"ssh_user": user, "ssh_private_key": key}
cfg["setup_commands"] = [c.replace("make cpu-torch install", "make install") for c in cfg["setup_commands"]]
cfg["head_start_ray_commands"][-1] += " " + ports
yaml.safe_dump(cfg, open(dst, "w"), sort_keys=False)
EOF
# What the node gets: the checkout's files that git tracks or would track. (`ray up` hashes everything
# under a file mount, rsync_exclude or not: .venv's GBs, and a runs/ that a running job changes.)
mkdir "$WORK/src"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | rsync -a --from0 --files-from=- . "$WORK/src")
cd "$WORK/src"
echo "== ray up"
time "$RAY" up -y --no-config-cache "$CLUSTER"

echo "== mmcl run on the head (ray exec)"
time "$RAY" exec "$CLUSTER" "cd ~/mmcl && RAY_AUTH_MODE=token .venv/bin/mmcl run --address 127.0.0.1:6379 --tasks 2 train.epochs=2"

echo "== mmcl run through the Ray Jobs API, from this checkout"
time RAY_AUTH_MODE=token "$RAY" job submit --address "http://127.0.0.1:$DASHBOARD_PORT" --working-dir . -- \
  mmcl run --tasks 2 train.epochs=2
echo "== the same without the token is refused"
"$RAY" job list --address "http://127.0.0.1:$DASHBOARD_PORT" 2>&1 | tail -1 || true

echo "== ray status"
"$RAY" exec "$CLUSTER" "RAY_AUTH_MODE=token ~/mmcl/.venv/bin/ray status"
echo "== ray down"
time "$RAY" down -y "$CLUSTER"
sleep 15  # ray up's SSH master connections persist for 10 s
left=$(ps -u "$NODE_USER" -o comm= | grep -vc '^sshd' || true)
echo "== processes of $NODE_USER left after ray down: $left"
[ "$left" = 0 ]
