// Key Vault of one regional deployment, in RBAC mode with purge protection. It holds the
// connector's secrets, which the Function App reads through Key Vault references:
//   connector-secret-key    -> CONNECTOR_SECRET_KEY
//   smart-private-key       -> SMART_PRIVATE_KEY
//   graph-notification-cert -> GRAPH_NOTIFICATION_CERT
//   entra-client-secret     -> ENTRA_CLIENT_SECRET
// Secret values are never part of a template: operators set them after provisioning
// (infra/README.md, infra/hooks/postprovision.sh). With privateNetworking, public network access
// is off: the app resolves the references through its VNet integration and the vault's private
// endpoint, and operators set secrets from inside the network (docs/operations.md).
param name string
param location string = resourceGroup().location
param tags object = {}
param logAnalyticsWorkspaceId string
@description('Turn public network access off (reached through a private endpoint only).')
param privateNetworking bool = false

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  //checkov:skip=CKV_AZURE_109:Default action is Deny whenever privateNetworking is on (the production parameter files); checkov cannot evaluate the conditional, CKV_CONNECTOR_12 proves it. With it off (first bootstrap, dev), data-plane access is Entra ID RBAC only.
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    enabledForDeployment: false
    enabledForDiskEncryption: false
    enabledForTemplateDeployment: false
    publicNetworkAccess: privateNetworking ? 'Disabled' : 'Enabled'
    networkAcls: {
      defaultAction: privateNetworking ? 'Deny' : 'Allow'
      bypass: privateNetworking ? 'None' : 'AzureServices'
    }
  }
}

// Audit every secret read and write (who, from where, which secret; never the value), with the
// vault's metrics (availability, latency, throttling).
resource auditLogs 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'audit-to-log-analytics'
  scope: vault
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        categoryGroup: 'audit'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

output name string = vault.name
output id string = vault.id
output uri string = vault.properties.vaultUri
