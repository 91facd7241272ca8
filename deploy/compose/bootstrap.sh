#!/bin/sh
# One-shot set-up of the docker-compose mesh (deploy/docker-compose.yml), run with the `mandate` CLI
# once the control plane is ready; safe to run again (`docker compose up` does, every time):
#
#   1. registers the agents `researcher` (may call the tool's `search` on its own) and `intruder`
#      (registered, but with no ceiling: the reference policy denies it everything) and the service
#      `tool`, reached by the agents at tool:8080, its sidecar accepting mTLS at tool:15006 — or, when
#      a name is registered already, issues it a fresh join token;
#   2. pushes the reference policy (compiled, tested and signed by the control plane);
#   3. writes each sidecar's join token into $JOIN_DIR/<name>.yaml, a `mandate-proxy --config` file
#      (`join-token: …`), so the token never shows in an environment or a command line.
#
# The CLI finds the control plane in MANDATE_SERVER, MANDATE_CACERT and MANDATE_ADMIN_TOKEN_FILE
# (or MANDATE_ADMIN_TOKEN). Other settings, with the values docker-compose.yml gives:
#   JOIN_DIR          where the token files go                                (/var/lib/mandate)
#   JOIN_TOKEN_GROUP  group that may read them: the sidecars' gid, 1337; unset: only this user
#   POLICY_DIR        the policy to push                               (/policies/reference)
#   TOOL_ADDRESS      where agents call the tool                                  (tool:8080)
#   TOOL_INBOUND      where the tool's sidecar accepts mTLS                      (tool:15006)
#   READY_TIMEOUT     seconds to wait for the control plane to answer                    (60)
set -eu

JOIN_DIR=${JOIN_DIR:-/var/lib/mandate}
POLICY_DIR=${POLICY_DIR:-/policies/reference}
TOOL_ADDRESS=${TOOL_ADDRESS:-tool:8080}
TOOL_INBOUND=${TOOL_INBOUND:-tool:15006}
READY_TIMEOUT=${READY_TIMEOUT:-60}

fail() {
    echo "bootstrap: $*" >&2
    exit 1
}

# Waits until the admin API answers (docker-compose.yml also waits for the control plane's
# /readyz; this covers a CA file or token written a moment later, and runs by hand).
wait_for_control_plane() {
    waited=0
    until out=$(mandate agent list 2>&1); do
        waited=$((waited + 1))
        [ "$waited" -lt "$READY_TIMEOUT" ] ||
            fail "the control plane at ${MANDATE_SERVER:-the default server} did not answer within ${READY_TIMEOUT}s: $out"
        sleep 1
    done
}

# The join token (mjt1.…) in what `register` or `token` printed.
token_in() {
    printf '%s\n' "$1" | grep -o 'mjt1\.[^[:space:]]*' | head -n 1
}

# enrol KIND NAME REGISTER-ARGS…: registers KIND (agent|service) NAME, or issues a fresh join token
# when it is registered already, and writes the token to $JOIN_DIR/NAME.yaml.
enrol() {
    kind=$1
    name=$2
    shift 2
    if shown=$(mandate "$kind" show "$name" 2>&1); then
        out=$(mandate "$kind" token "$name") || fail "cannot issue a join token for $kind $name"
        echo "bootstrap: $kind $name is registered already: issued a fresh join token"
    else
        case $shown in
            *"(HTTP 404)"*) ;;
            *) fail "cannot look up $kind $name: $shown" ;;
        esac
        out=$(mandate "$kind" register "$name" "$@") || fail "cannot register $kind $name"
        echo "bootstrap: registered $kind $name"
    fi
    token=$(token_in "$out")
    [ -n "$token" ] || fail "no join token (mjt1.…) in what \`mandate $kind\` printed for $name"
    file="$JOIN_DIR/$name.yaml"
    # Written whole under another name, then renamed: a sidecar never reads half a token.
    printf 'join-token: %s\n' "$token" >"$file.tmp"
    if [ -n "${JOIN_TOKEN_GROUP:-}" ]; then
        chgrp "$JOIN_TOKEN_GROUP" "$file.tmp"
    fi
    mv "$file.tmp" "$file"
    echo "bootstrap: join token for $kind $name written to $file"
}

[ -d "$POLICY_DIR" ] || fail "POLICY_DIR $POLICY_DIR is not a directory"
mkdir -p "$JOIN_DIR"
if [ -n "${JOIN_TOKEN_GROUP:-}" ]; then
    # The sidecars (another uid, this group) must reach the files but not write them.
    umask 027
    chgrp "$JOIN_TOKEN_GROUP" "$JOIN_DIR"
    chmod 0750 "$JOIN_DIR"
else
    umask 077
fi

wait_for_control_plane

enrol agent researcher --owner alice@example.com \
    --description "Research assistant: searches the code index on its own, nothing else" \
    --ceiling '{"host": "tool", "tool": "search"}' \
    --autonomous '{"host": "tool", "tool": "search"}'
enrol agent intruder --owner mallory@example.com \
    --description "Registered, but granted nothing: every call it makes is denied"
enrol service tool --owner tools@example.com \
    --description "MCP server with the tools search and delete_repo" \
    --address "$TOOL_ADDRESS" --inbound "$TOOL_INBOUND"

mandate policy push "$POLICY_DIR" -m "docker-compose bootstrap"
echo "bootstrap: done"
