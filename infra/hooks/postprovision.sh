#!/bin/sh
# azd postprovision hook (also usable by hand): make sure the region's Key Vault holds the four
# secrets the Function App references. Secrets that already exist are never overwritten.
#   connector-secret-key     generated: 32 random bytes, base64
#   smart-private-key        generated: RSA 3072 private key, PEM (PKCS#8)
#   graph-notification-cert  generated: self-signed RSA 2048 certificate + private key, PEM
#   entra-client-secret      taken from $ENTRA_CLIENT_SECRET when set, otherwise reported missing
# Needs: az (logged in, with Key Vault Secrets Officer on the vault; azd grants it to the
# signed-in user through principalId) and openssl. With private networking on, the vault's public
# endpoint is closed: run this from inside the virtual network, or bootstrap once with private
# networking off (docs/operations.md, "First deployment"); the hook says so instead of retrying.
#   AZURE_KEY_VAULT_NAME=kv... sh infra/hooks/postprovision.sh
set -eu

vault="${AZURE_KEY_VAULT_NAME:?AZURE_KEY_VAULT_NAME is not set (an output of infra/main.bicep)}"
umask 077
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT INT TERM

exists() {
    az keyvault secret show --vault-name "$vault" --name "$1" --query id -o tsv >/dev/null 2>&1
}

# Fail fast (and say why) when the vault refuses this machine's network, instead of taking a
# closed public endpoint for missing secrets and retrying for minutes.
reachable() {
    if out="$(az keyvault secret list --vault-name "$vault" --maxresults 1 -o none 2>&1)"; then
        return 0
    fi
    case "$out" in
    *ForbiddenByConnection* | *ForbiddenByFirewall* | *"ublic network access"*)
        echo "Key Vault $vault refuses connections from this machine: private networking is on, so" >&2
        echo "its public endpoint is closed. Set the secrets from a machine inside the virtual network," >&2
        echo "or bootstrap the region once with private networking off (docs/operations.md):" >&2
        echo "  azd env set CONNECTOR_PRIVATE_NETWORKING false && azd provision   # sets the secrets" >&2
        echo "  azd env set CONNECTOR_PRIVATE_NETWORKING true && azd provision    # public access off" >&2
        return 1
        ;;
    esac
    return 0 # anything else (role assignment not propagated yet) is retried by put()
}
reachable

put() { # name file
    # New role assignments can take a few minutes to reach Key Vault: retry.
    tries=0
    until az keyvault secret set --vault-name "$vault" --name "$1" --file "$2" \
        --content-type "${3:-text/plain}" --query id -o tsv >/dev/null; do
        tries=$((tries + 1))
        if [ "$tries" -ge 10 ]; then
            echo "could not write secret $1 to $vault" >&2
            return 1
        fi
        echo "waiting for Key Vault permissions to propagate ($tries/10)..."
        sleep 30
    done
    echo "set secret $1"
}

if exists connector-secret-key; then
    echo "secret connector-secret-key exists, kept"
else
    openssl rand -base64 32 | tr -d '\n' >"$tmp/secret-key"
    put connector-secret-key "$tmp/secret-key"
fi

if exists smart-private-key; then
    echo "secret smart-private-key exists, kept"
else
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072 -out "$tmp/smart.pem" 2>/dev/null
    put smart-private-key "$tmp/smart.pem" application/x-pem-file
fi

if exists graph-notification-cert; then
    echo "secret graph-notification-cert exists, kept"
else
    openssl req -x509 -newkey rsa:2048 -nodes -days 730 \
        -subj "/CN=ehr-connector-graph-notifications-${CONNECTOR_REGION:-region}" \
        -keyout "$tmp/graph-key.pem" -out "$tmp/graph-cert.pem" 2>/dev/null
    cat "$tmp/graph-cert.pem" "$tmp/graph-key.pem" >"$tmp/graph.pem"
    put graph-notification-cert "$tmp/graph.pem" application/x-pem-file
fi

if exists entra-client-secret; then
    echo "secret entra-client-secret exists, kept"
elif [ -n "${ENTRA_CLIENT_SECRET:-}" ]; then
    printf '%s' "$ENTRA_CLIENT_SECRET" >"$tmp/entra"
    put entra-client-secret "$tmp/entra"
else
    echo "secret entra-client-secret is MISSING: create a client secret on the Entra app registration, then" >&2
    echo "  az keyvault secret set --vault-name $vault --name entra-client-secret --file <file holding the secret>" >&2
fi

if [ "${CONNECTOR_PRIVATE_NETWORKING:-}" = "false" ]; then
    echo "WARNING: private networking is OFF in this region: storage and Key Vault accept public" >&2
    echo "network traffic (Entra ID only). For production: azd env set CONNECTOR_PRIVATE_NETWORKING" >&2
    echo "true, then azd provision (docs/operations.md, \"Private networking\")." >&2
fi
