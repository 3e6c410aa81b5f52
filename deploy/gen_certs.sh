#!/usr/bin/env bash
# Self-signed CA + SuperLink certificate for the TLS compose variant (docker-compose.tls.yml).
# Usage: deploy/gen_certs.sh [OUT_DIR=deploy/certs]. Private keys stay in OUT_DIR (gitignored).
set -euo pipefail
out="${1:-$(dirname "$0")/certs}"
mkdir -p "$out"
cd "$out"
if [[ -f ca.crt && -f server.pem && -f server.key ]]; then
  echo "certificates exist in $out; remove them to regenerate"; exit 0
fi
umask 077
openssl genrsa -out ca.key 4096 2>/dev/null
openssl req -x509 -new -nodes -key ca.key -sha256 -days 365 -subj "/CN=fedmoe-ca" -out ca.crt
openssl genrsa -out server.key 4096 2>/dev/null
cat > server.ext <<EXT
subjectAltName = DNS:superlink, DNS:localhost, IP:127.0.0.1
extendedKeyUsage = serverAuth
EXT
openssl req -new -key server.key -subj "/CN=superlink" -out server.csr
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256 \
  -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 644 ca.crt server.pem
echo "wrote $out/{ca.crt,ca.key,server.pem,server.key}"
