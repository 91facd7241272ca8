#!/usr/bin/env bash
# The sidecar injector's serving certificate, from a private CA made on the spot (openssl only):
#
#   deploy/kubernetes/webhook-cert.sh OUTDIR [SERVICE [NAMESPACE [DAYS]]]
#
# writes OUTDIR/ca.crt (for the MutatingWebhookConfiguration's caBundle), OUTDIR/tls.crt and
# OUTDIR/tls.key (mode 0600; for the Secret mandate-webhook-tls), for the DNS name the API server
# calls: SERVICE.NAMESPACE.svc (default mandate.mandate-system.svc), valid DAYS days (default 365).
# The CA's key is deleted once it has signed: to renew, run the script again and replace both the
# Secret and the caBundle. cert-manager (cert-manager.yaml) renews on its own instead.
set -euo pipefail

out=${1:?usage: webhook-cert.sh OUTDIR [SERVICE [NAMESPACE [DAYS]]]}
service=${2:-mandate}
namespace=${3:-mandate-system}
days=${4:-365}
dns="$service.$namespace.svc"

umask 077
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$days" \
    -subj "/CN=mandate webhook CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$work/ca.key" -out "$work/ca.crt"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=$dns" -keyout "$work/tls.key" -out "$work/tls.csr"
printf '%s\n' \
    "subjectAltName=DNS:$dns" \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" >"$work/ext.cnf"
openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$days" -extfile "$work/ext.cnf" \
    -out "$work/tls.crt"

install -m 0644 "$work/ca.crt" "$out/ca.crt"
install -m 0644 "$work/tls.crt" "$out/tls.crt"
install -m 0600 "$work/tls.key" "$out/tls.key"
echo "webhook-cert.sh: $out/tls.crt and tls.key for $dns (valid $days days), signed by $out/ca.crt"
