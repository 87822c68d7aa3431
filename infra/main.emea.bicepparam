// Parameters of the emea deployment (West Europe). The three main.<region>.bicepparam files differ
// only in region and location (tests/infra checks this); everything else comes from the
// environment, so one set of variables serves all three regions:
//   az deployment sub create --location westeurope --template-file infra/main.bicep \
//       --parameters infra/main.emea.bicepparam
using './main.bicep'

param region = 'emea'
param location = 'westeurope'

param environmentName = readEnvironmentVariable('AZURE_ENV_NAME', '')
param publicUrl = readEnvironmentVariable('CONNECTOR_PUBLIC_URL', '')
param portalUrl = readEnvironmentVariable('CONNECTOR_PORTAL_URL', '')
param entraClientId = readEnvironmentVariable('ENTRA_CLIENT_ID', '')
param entraApiAudience = readEnvironmentVariable('ENTRA_API_AUDIENCE', '')
param smartClientId = readEnvironmentVariable('SMART_CLIENT_ID', '')
param allowedTenants = readEnvironmentVariable('CONNECTOR_ALLOWED_TENANTS', '')
param ehrPrivateTargets = readEnvironmentVariable('CONNECTOR_EHR_PRIVATE_TARGETS', '')
param principalId = readEnvironmentVariable('AZURE_PRINCIPAL_ID', '')
param alertEmail = readEnvironmentVariable('CONNECTOR_ALERT_EMAIL', '')

// Production: storage and Key Vault only through private endpoints, the app VNet-integrated
// (docs/operations.md, "Private networking").
param privateNetworking = true
