// Key Vault of one regional deployment, in RBAC mode with purge protection. It holds the
// connector's secrets, which the Function App reads through Key Vault references:
//   connector-secret-key    -> CONNECTOR_SECRET_KEY
//   smart-private-key       -> SMART_PRIVATE_KEY
//   graph-notification-cert -> GRAPH_NOTIFICATION_CERT
//   entra-client-secret     -> ENTRA_CLIENT_SECRET
// Secret values are never part of a template: operators set them after provisioning
// (infra/README.md, infra/hooks/postprovision.sh).
param name string
param location string = resourceGroup().location
param tags object = {}
param logAnalyticsWorkspaceId string

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  //checkov:skip=CKV_AZURE_109:The Flex Consumption app is not VNet-integrated, so Key Vault references resolve over the public endpoint; the vault allows data-plane access only through Entra ID RBAC (no access policies).
  //checkov:skip=CKV_AZURE_189:Public network access stays enabled for the same reason; RBAC limits readers to the app's managed identity.
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
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

// Audit every secret read and write.
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
  }
}

output name string = vault.name
output id string = vault.id
output uri string = vault.properties.vaultUri
