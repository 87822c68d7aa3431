// Storage account of one regional deployment:
//  - the connector's tables and queues (CONNECTOR_STORAGE__tableServiceUri / __queueServiceUri),
//    created here so the app's role assignments can be scoped to each of them (app/rbac.bicep),
//  - the Functions host storage (AzureWebJobsStorage__*: the azure-webjobs-hosts and
//    azure-webjobs-secrets containers),
//  - a private blob container holding the Flex Consumption deployment package.
// Only Entra ID (managed identity) access: shared keys, SAS and anonymous blob access are off.
// With privateNetworking, public network access is off too: the app reaches the account through
// its VNet integration and the private endpoints (main.bicep).
// Resource logs (reads, writes, deletes of blobs, queues and tables) and transaction metrics go to
// the Log Analytics workspace. They name tables, partition and row keys (keyed hashes, random
// ids) and message ids, never entity contents.
param name string
param location string = resourceGroup().location
param tags object = {}
param skuName string = 'Standard_GRS'
param deploymentContainerName string
@minValue(1)
@maxValue(365)
param softDeleteRetentionDays int = 7
@description('Turn public network access off (reached through private endpoints only).')
param privateNetworking bool = false
@description('Tables the connector uses (full names, vv<region><kind>).')
param tableNames array
@description('Queues the connector uses, poison queues included.')
param queueNames array
@description('Blob containers of the Functions host storage.')
param hostContainerNames array = [
  'azure-webjobs-hosts'
  'azure-webjobs-secrets'
]
param logAnalyticsWorkspaceId string

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  //checkov:skip=CKV_AZURE_35:Default action is Deny whenever privateNetworking is on (the production parameter files); checkov cannot evaluate the conditional, CKV_CONNECTOR_11 proves it. With it off (first bootstrap, dev), access is Entra ID + RBAC only (shared keys off).
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: skuName
  }
  properties: {
    accessTier: 'Hot'
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowCrossTenantReplication: false
    isLocalUserEnabled: false
    isSftpEnabled: false
    publicNetworkAccess: privateNetworking ? 'Disabled' : 'Enabled'
    networkAcls: {
      defaultAction: privateNetworking ? 'Deny' : 'Allow'
      bypass: privateNetworking ? 'None' : 'AzureServices'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: {
          enabled: true
          keyType: 'Account'
        }
        file: {
          enabled: true
          keyType: 'Account'
        }
        queue: {
          enabled: true
          keyType: 'Account'
        }
        table: {
          enabled: true
          keyType: 'Account'
        }
      }
    }
  }
}

resource blobServices 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: softDeleteRetentionDays
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: softDeleteRetentionDays
    }
  }
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobServices
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource hostContainers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = [for container in hostContainerNames: {
  parent: blobServices
  name: container
  properties: {
    publicAccess: 'None'
  }
}]

resource queueServices 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource queues 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = [for queue in queueNames: {
  parent: queueServices
  name: queue
}]

resource tableServices 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource tables 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = [for table in tableNames: {
  parent: tableServices
  name: table
}]

// --- diagnostic settings: everything to the region's Log Analytics workspace -------------------
var serviceLogs = [
  {
    category: 'StorageRead'
    enabled: true
  }
  {
    category: 'StorageWrite'
    enabled: true
  }
  {
    category: 'StorageDelete'
    enabled: true
  }
]
var transactionMetrics = [
  {
    category: 'Transaction'
    enabled: true
  }
]

resource accountDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: storage
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    metrics: transactionMetrics
  }
}

resource blobDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: blobServices
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: serviceLogs
    metrics: transactionMetrics
  }
}

resource queueDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: queueServices
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: serviceLogs
    metrics: transactionMetrics
  }
}

resource tableDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: tableServices
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: serviceLogs
    metrics: transactionMetrics
  }
}

output name string = storage.name
output id string = storage.id
output blobEndpoint string = storage.properties.primaryEndpoints.blob
output queueEndpoint string = storage.properties.primaryEndpoints.queue
output tableEndpoint string = storage.properties.primaryEndpoints.table
