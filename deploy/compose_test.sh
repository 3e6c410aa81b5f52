#!/usr/bin/env bash
# make compose-test: the one-host compose federation for real, on a fresh Debian machine.
#   installs Docker/debootstrap if missing (apt), starts dockerd if none runs, builds the base and
#   fedmoe images, provisions kits (TLS, SuperNode keys, released app pinned by every bank), brings
#   up docker-compose.yml, runs a 3-round `tiny` job, kills and restarts bank-1's SuperNode
#   mid-job, checks the job finishes and an unapproved app is refused, tears everything down, and
#   prints the wall time, the image size and what the server printed.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=runs/compose-test
PROJECT=fedmoe-ct
PY=.venv/bin/python
mkdir -p "$OUT"
log() { echo "[compose-test $(( $(date +%s) - START ))s] $*"; }

# ---- Docker ------------------------------------------------------------------------------------
if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null || ! command -v debootstrap >/dev/null; then
  log "installing docker.io docker-compose debootstrap (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd (no bridge/iptables: this machine's kernel setup; user-defined networks still work)"
  nohup dockerd --storage-driver overlay2 --iptables=false --ip-forward=false --ip-masq=false --bridge=none \
    > "$OUT/dockerd.log" 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
docker info >/dev/null

# ---- images ------------------------------------------------------------------------------------
deploy/base_image.sh fedmoe-base:bookworm
# Image and released app come from the committed tree (HEAD), as a release comes from a tag: a
# working tree that is being edited is not a release.
SRC="$(mktemp -d /tmp/fedmoe-release.XXXXXX)"
git archive HEAD | tar -x -C "$SRC"
COMMIT=$(git rev-parse --short HEAD)
cp /usr/local/share/ca-certificates/*.crt "$SRC/deploy/build-ca/" 2>/dev/null || true  # TLS-intercepting proxy CAs
FIND_LINKS=""
WHEELS="$(pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p" | head -1)"
if [[ -n "$WHEELS" && -d "$WHEELS" ]]; then  # the local torch CPU wheel, served to the build
  WPORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  (cd "$WHEELS" && exec python3 -m http.server "$WPORT" --bind 127.0.0.1 >/dev/null 2>&1) &
  WHEEL_PID=$!
  FIND_LINKS="http://127.0.0.1:$WPORT/"
  sleep 1
fi
cleanup() {
  docker-compose -p "$PROJECT" logs --no-color > "$OUT/compose.log" 2>&1 || true
  docker-compose -p "$PROJECT" down -v --remove-orphans >/dev/null 2>&1 || true
  [[ -n "${WHEEL_PID:-}" ]] && kill "$WHEEL_PID" 2>/dev/null || true
  rm -rf "$SRC"
}
trap cleanup EXIT
log "building fedmoe:latest from commit $COMMIT"
docker build -q --network host -f "$SRC/deploy/Dockerfile" -t fedmoe:latest \
  --build-arg BASE_IMAGE=fedmoe-base:bookworm \
  ${FIND_LINKS:+--build-arg PIP_FIND_LINKS=$FIND_LINKS --build-arg TORCH_INDEX_URL=https://pypi.org/simple} \
  "$SRC" > "$OUT/build.log"
IMAGE_SIZE=$(docker image inspect -f '{{.Size}}' fedmoe:latest)

# ---- kits and the federation ---------------------------------------------------------------------
log "provisioning deploy/kits (CA, SuperLink cert, bank keys, released app pinned by every bank)"
find deploy/kits -mindepth 1 -maxdepth 1 ! -name .gitignore -exec rm -rf {} +
$PY -m fedmoe.fl_server.provision --out deploy/kits --banks 3 --app "$SRC" > "$OUT/provision.log"
APP=deploy/kits/release/app
DIGEST=$(cut -d' ' -f1 deploy/kits/release/app.sha256)
PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export FEDMOE_PORT=$PORT
docker-compose -p "$PROJECT" down -v --remove-orphans >/dev/null 2>&1 || true
log "docker-compose up (SuperLink on 127.0.0.1:$PORT)"
if ! docker-compose -p "$PROJECT" up -d > "$OUT/up.log" 2>&1; then
  tail -5 "$OUT/up.log"; log "docker-compose up failed; service logs in $OUT/compose.log"; exit 1
fi
for _ in $(seq 90); do
  healthy=$(docker-compose -p "$PROJECT" ps | grep -c "(healthy)" || true)
  [[ "$healthy" -ge 8 ]] && break; sleep 2
done
docker-compose -p "$PROJECT" ps

export FLWR_HOME="$PWD/$OUT/flwr-home"
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "compose"

[superlink.compose]
address = "127.0.0.1:$PORT"
root-certificates = "$PWD/deploy/kits/server/secrets/ca.crt"
TOML
export FLWR_TELEMETRY_ENABLED=0
JOB='key-dir="/keys" server-state-dir="/state/server" job-id="ct" num-rounds=3 model-preset="tiny" local-steps=3 records-per-bank=240 seq-len=48 batch-size=16 min-banks=3 round-timeout=600.0 rejoin-grace=120.0'
RUN=$(.venv/bin/flwr run "$APP" compose --run-config "$JOB" --format json | $PY -c 'import json,sys; print(json.load(sys.stdin)["run-id"])')
log "submitted run $RUN (app sha256 ${DIGEST:0:16}, pinned by every bank)"

# Kill bank-1's SuperNode once round 1's masked-input request (the one it trains on) reached it, i.e.
# after it said ready at the pre-flight, then bring it back. Round 1 then cannot reach its threshold
# (3 of 3); round 2 must have bank-1 back: the server waits up to rejoin-grace for a known bank, and
# the restarted SuperNode retries activation until the SuperLink lets its key in again.
for _ in $(seq 150); do
  docker-compose -p "$PROJECT" logs bank-1 2>/dev/null | grep -q "Receiving: train.secagg_masked_input" && break; sleep 2
done
log "killing bank-1 (SuperNode container) mid-round"
docker-compose -p "$PROJECT" kill bank-1 >/dev/null 2>&1
sleep 5
docker-compose -p "$PROJECT" start bank-1 >/dev/null 2>&1
log "bank-1 restarted"

STATUS=""
for _ in $(seq 300); do
  STATUS=$(.venv/bin/flwr list compose --run-id "$RUN" --format json 2>/dev/null | $PY -c 'import json,sys; print(json.load(sys.stdin)["runs"][0]["status"])' 2>/dev/null || true)
  [[ "$STATUS" == finished* ]] && break; sleep 3
done
log "run $RUN: $STATUS"
.venv/bin/flwr log "$RUN" compose --show > "$OUT/server-output.log" 2>&1 || true
docker run --rm -v "${PROJECT}_server-state:/s:ro" fedmoe:latest cat /s/server/ct/state.json > "$OUT/state.json" || true

# An app bundle the banks did not approve: refused at every bank before any of its code runs.
EVIL="$OUT/unapproved-app"; rm -rf "$EVIL"; cp -r "$APP" "$EVIL"; echo "# tampered" >> "$EVIL/fedmoe/fl_client/app.py"
EVIL_JOB=${JOB/job-id=\"ct\"/job-id=\"ct-evil\"}
RUN2=$(.venv/bin/flwr run "$EVIL" compose --run-config "$EVIL_JOB" --format json | $PY -c 'import json,sys; print(json.load(sys.stdin).get("run-id", ""))' || true)
log "submitted a tampered copy of the app as run ${RUN2:-?}"
REFUSED=0
for _ in $(seq 60); do
  REFUSED=$(docker-compose -p "$PROJECT" logs bank-0-apps bank-1-apps bank-2-apps 2>/dev/null | grep -c "is not approved by this bank" || true)
  [[ "$REFUSED" -ge 1 ]] && break; sleep 2
done
[[ -n "$RUN2" ]] && .venv/bin/flwr stop "$RUN2" compose >/dev/null 2>&1 || true
RESTARTS=$(docker inspect -f '{{.RestartCount}}' "${PROJECT}_bank-1_1" 2>/dev/null || echo "?")
docker-compose -p "$PROJECT" logs --no-color > "$OUT/compose.log" 2>&1 || true

# ---- verdict -----------------------------------------------------------------------------------
set +e
$PY - "$OUT/state.json" "$STATUS" "$REFUSED" <<'PYEOF'
import json, sys
path, status, refused = sys.argv[1], sys.argv[2], int(sys.argv[3] or 0)
state = json.load(open(path))
ok = status == "finished:completed" and state.get("finished") and state.get("completed_round") == 3
for r in state.get("rounds", []):
    print(f"round {r['round']}: participants {r['participants']} left out {r.get('left_out')}")
rounds = state.get("rounds", [])
# Not "in some later round" (that raced the job): in every round after the one it was killed in.
rejoined = len(rounds) == 3 and all("bank-1" in r["participants"] and r["aggregated"] for r in rounds[1:])
# Round 1: bank-1's executor (its own container) may finish and reply through the restarted SuperNode
# in time, or the round names bank-1 as the bank that broke it.
first = rounds[0].get("outcomes", {}).get("bank-1") if rounds else None
named = first in ("contributed", "crashed after ready", "no reply", "client error")
print(f"round 1: bank-1 {first}; no aggregate: {rounds[0].get('no_aggregate') if rounds else '-'}")
print(f"bank-1 back in rounds 2 and 3 after its restart: {rejoined}; unapproved app refused by {refused} bank log line(s)")
rejoined = rejoined and named
sys.exit(0 if ok and rejoined and refused >= 1 else 1)
PYEOF
VERDICT=$?
set -e
echo "----- what the server printed (flwr log $RUN) -----"
grep -v "^\s*$" "$OUT/server-output.log" | tail -40
echo "---------------------------------------------------"
log "bank-1 SuperNode: killed once, restarted by hand, then $RESTARTS automatic restart(s) until the SuperLink let it activate again"
log "commit $COMMIT; image fedmoe:latest: $(( IMAGE_SIZE / 1000000 )) MB; wall time $(( $(date +%s) - START )) s; verdict $([[ $VERDICT == 0 ]] && echo PASS || echo FAIL)"
exit $VERDICT
