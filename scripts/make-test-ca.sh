#!/usr/bin/env bash
# Makes a local test certificate authority and certificates for TLS and mutual TLS between the
# gateways, the cloud worker and the brokers. For tests and trials only: production keys come
# from your own PKI, and no key is ever committed (keys/ and out/ are gitignored).
#
#   scripts/make-test-ca.sh DIR [CLIENT ...]
#
# writes into DIR (created if needed, mode 0700):
#   ca.pem, ca.key           the CA (EC P-256, 10 years)
#   server.pem, server.key   the broker's certificate, for localhost, 127.0.0.1 and ::1, plus
#                            the names in $DIREDI_SERVER_NAMES (comma separated DNS names)
#   CLIENT.pem, CLIENT.key   one client certificate per CLIENT, whose subject CN is CLIENT.
#                            Mosquitto's `use_identity_as_username` makes the CN the MQTT user
#                            name that broker-config/mosquitto/acl matches: a gateway's CN is
#                            its gateway id; the cloud worker's is diredi-cloud-worker.
# Default clients: gw-1 gw-2 diredi-cloud-worker diredi-monitor.
# Existing files are kept, so the script can add clients to a CA made earlier.
set -euo pipefail

if [ $# -lt 1 ]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
dir=$1
shift
clients=("$@")
if [ ${#clients[@]} -eq 0 ]; then
  clients=(gw-1 gw-2 diredi-cloud-worker diredi-monitor)
fi
command -v openssl >/dev/null || { echo "make-test-ca: openssl is needed (apt-get install openssl)" >&2; exit 1; }

mkdir -p "$dir"
chmod 0700 "$dir"
cd "$dir"
umask 077

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [ ! -f ca.pem ]; then
  key ca.key
  openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=DiReDi test CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.pem
fi

# sign NAME EXTENSIONS: NAME.key and NAME.pem signed by the CA.
sign() {
  local name=$1 ext=$2
  [ -f "$name.pem" ] && return 0
  key "$name.key"
  openssl req -new -key "$name.key" -subj "/CN=$name" -out "$name.csr"
  printf '%b' "$ext" >"$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 \
    -days 825 -extfile "$name.ext" -out "$name.pem" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

san="DNS:localhost,IP:127.0.0.1,IP:::1"
if [ -n "${DIREDI_SERVER_NAMES:-}" ]; then
  IFS=, read -r -a extra <<<"$DIREDI_SERVER_NAMES"
  for n in "${extra[@]}"; do san="$san,DNS:$n"; done
fi
sign server "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=$san\n"
for c in "${clients[@]}"; do
  case $c in
    */* | *+* | *'#'* | '' ) echo "make-test-ca: $c cannot be an MQTT user name / gateway id" >&2; exit 1 ;;
    fleet ) echo "make-test-ca: fleet names the fleet-wide topics, not a client" >&2; exit 1 ;;
  esac
  sign "$c" "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
done
# Certificates are public; keys stay 0600.
chmod 0644 ./*.pem
echo "make-test-ca: CA and certificates in $dir (server, ${clients[*]})"
