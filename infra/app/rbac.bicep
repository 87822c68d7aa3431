// Least-privilege role assignments, each named by guid(scope, principal, role) so that
// re-deployments are idempotent. Each is scoped to the single resource it concerns: storage data
// roles to the one table, queue or blob container the app uses, never the whole account.
//
// Function App identity:
//   Storage Table Data Contributor  each connector table (configs, mappings, visits, ...)
//   Storage Queue Data Contributor  each connector queue and its poison queue
//   Storage Blob Data Owner         the Functions host containers (azure-webjobs-hosts: leases,
//                                   timers; azure-webjobs-secrets: host keys)
//   Storage Blob Data Contributor   the deployment package container
//   Key Vault Secrets User          read the secrets behind the Key Vault references
//   Monitoring Metrics Publisher    send telemetry to Application Insights (local auth disabled)
// Operator (optional, principalId):
//   Key Vault Secrets Officer       set and rotate the secrets
//   Storage Queue Data Contributor  the queues in operatorQueueNames (read and replay the poison
//                                   queues with devtools/replay_poison.py)
param storageAccountName string
param keyVaultName string
param applicationInsightsName string
param appPrincipalId string
@description('Tables the app reads and writes (full names).')
param tableNames array
@description('Queues the app reads and writes, poison queues included.')
param queueNames array
@description('Blob containers of the Functions host storage.')
param hostContainerNames array
param deploymentContainerName string
param operatorPrincipalId string = ''
@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param operatorPrincipalType string = 'User'
@description('Queues the operator may peek, read and move messages between (poison queue replay).')
param operatorQueueNames array = []

var roles = {
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  keyVaultSecretsUser: '4633458b-17de-408a-b874-0445c86b69e6'
  keyVaultSecretsOfficer: 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource blobServices 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: storage
  name: 'default'
}

resource queueServices 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' existing = {
  parent: storage
  name: 'default'
}

resource tableServices 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' existing = {
  parent: storage
  name: 'default'
}

resource tables 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' existing = [for table in tableNames: {
  parent: tableServices
  name: table
}]

resource queues 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' existing = [for queue in queueNames: {
  parent: queueServices
  name: queue
}]

resource operatorQueues 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' existing = [for queue in operatorQueueNames: {
  parent: queueServices
  name: queue
}]

resource hostContainers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = [for container in hostContainerNames: {
  parent: blobServices
  name: container
}]

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobServices
  name: deploymentContainerName
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource tableContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for (table, i) in tableNames: {
  name: guid(tables[i].id, appPrincipalId, roles.storageTableDataContributor)
  scope: tables[i]
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataContributor)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}]

resource queueContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for (queue, i) in queueNames: {
  name: guid(queues[i].id, appPrincipalId, roles.storageQueueDataContributor)
  scope: queues[i]
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataContributor)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}]

resource hostBlobOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for (container, i) in hostContainerNames: {
  name: guid(hostContainers[i].id, appPrincipalId, roles.storageBlobDataOwner)
  scope: hostContainers[i]
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataOwner)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}]

resource packageContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(deploymentContainer.id, appPrincipalId, roles.storageBlobDataContributor)
  scope: deploymentContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource secretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, appPrincipalId, roles.keyVaultSecretsUser)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsUser)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource metricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(applicationInsights.id, appPrincipalId, roles.monitoringMetricsPublisher)
  scope: applicationInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource operatorSecretsOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(operatorPrincipalId)) {
  name: guid(vault.id, operatorPrincipalId, roles.keyVaultSecretsOfficer)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsOfficer)
    principalId: operatorPrincipalId
    principalType: operatorPrincipalType
  }
}

resource operatorQueueContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for (queue, i) in operatorQueueNames: if (!empty(operatorPrincipalId)) {
  name: guid(operatorQueues[i].id, operatorPrincipalId, roles.storageQueueDataContributor)
  scope: operatorQueues[i]
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataContributor)
    principalId: operatorPrincipalId
    principalType: operatorPrincipalType
  }
}]
