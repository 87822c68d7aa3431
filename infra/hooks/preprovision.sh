#!/bin/sh
# azd preprovision hook: refuse to provision without a valid region, so a deployment can never
# come up serving the wrong geography.
set -eu
case "${CONNECTOR_REGION:-}" in
    americas|emea|apac) ;;
    *)
        echo "CONNECTOR_REGION must be americas, emea or apac (azd env set CONNECTOR_REGION <region>)." >&2
        exit 1
        ;;
esac
if [ -z "${AZURE_LOCATION:-}" ]; then
    echo "AZURE_LOCATION is not set (azd env set AZURE_LOCATION <azure region>)." >&2
    exit 1
fi
if [ -z "${ENTRA_CLIENT_ID:-}" ]; then
    echo "warning: ENTRA_CLIENT_ID is not set; the portal API and Microsoft 365 sign-in stay unusable until it is (azd env set ENTRA_CLIENT_ID <app id>, then azd provision)." >&2
fi
echo "Provisioning region ${CONNECTOR_REGION} in ${AZURE_LOCATION}."
