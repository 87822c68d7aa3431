// EHR virtual-visit connector: one regional deployment per call.
//
// Deploy at subscription scope; the template creates the region's resource group and everything
// in it. Each geography (americas, emea, apac) is deployed separately and shares nothing with the
// others: its own storage, Key Vault, identity, monitoring and Function App (data residency).
//
//   az deployment sub create --location westeurope --template-file infra/main.bicep \
//       --parameters infra/main.emea.bicepparam
//   azd up   (reads infra/main.parameters.json; set CONNECTOR_REGION and AZURE_LOCATION first)
targetScope = 'subscription'

@description('Geography this deployment serves; becomes CONNECTOR_REGION. Tenants of one region are never served by another.')
@allowed([
  'americas'
  'emea'
  'apac'
])
param region string

@minLength(1)
@description('Azure region for every resource of this deployment (must support Flex Consumption and lie in the geography).')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@maxLength(40)
@description('Name of the environment (azd sets AZURE_ENV_NAME). Empty: connector.')
param environmentName string = ''

@description('Resource group to create. Empty: rg-<environmentName>, with -<region> appended unless the name already contains the region.')
param resourceGroupName string = ''

@description('External base URL of this deployment without trailing slash (custom domain or Front Door). Empty: https://<function app default host name>.')
param publicUrl string = ''

@description('Optional: where the browser returns after the approver\'s EHR sign-in (CONNECTOR_PORTAL_URL).')
param portalUrl string = ''

@description('Application (client) id of the connector\'s multi-tenant Entra app registration (ENTRA_CLIENT_ID).')
param entraClientId string = ''

@description('Audience of portal access tokens (ENTRA_API_AUDIENCE). Empty: api://<entraClientId>.')
param entraApiAudience string = ''

@description('Entra authority host (ENTRA_AUTHORITY_HOST).')
param entraAuthorityHost string = 'https://login.microsoftonline.com'

@description('Microsoft Graph base URL (GRAPH_BASE_URL).')
param graphBaseUrl string = 'https://graph.microsoft.com'

@description('The connector\'s client id at the EHR (SMART_CLIENT_ID); a config may override it.')
param smartClientId string = ''

@description('Entra tenant ids (comma-separated) that may use this deployment\'s portal (CONNECTOR_ALLOWED_TENANTS). Empty: any tenant.')
param allowedTenants string = ''

@description('Private EHR addresses the connector may call, ADDRESS[/PREFIX][:PORT] comma-separated (CONNECTOR_EHR_PRIVATE_TARGETS). Empty: public EHR endpoints only.')
param ehrPrivateTargets string = ''

@description('Days visit records, nonces and delivery ledgers are kept after a visit ends (CONNECTOR_RETENTION_DAYS).')
@minValue(1)
@maxValue(3650)
param retentionDays int = 7

@description('Days an EHR user -> Entra mapping is kept after it was last used; then the clinician signs in once more (CONNECTOR_MAPPING_RETENTION_DAYS).')
@minValue(1)
@maxValue(3650)
param mappingRetentionDays int = 365

@description('Days the usage reports keep each visit\'s summary (no people\'s data) after its day (CONNECTOR_REPORT_RETENTION_DAYS).')
@minValue(1)
@maxValue(3650)
param reportRetentionDays int = 400

@description('Flex Consumption instance memory in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Flex Consumption maximum number of instances.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 100

@description('Replication of the storage account. Geo-redundant SKUs replicate to the paired region, which lies in the same geography.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
])
param storageSkuName string = 'Standard_GRS'

@description('Log Analytics retention in days.')
@minValue(30)
@maxValue(730)
param logRetentionInDays int = 90

@description('Object id of the operator (user) running the deployment (azd sets AZURE_PRINCIPAL_ID). When set, it may write the Key Vault secrets. Leave empty in pipelines.')
param principalId string = ''

@description('Type of principalId.')
@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param principalType string = 'User'

@description('Private networking: a VNet with the Function App\'s VNet integration and private endpoints for storage (blob, queue, table) and Key Vault, whose public network access is then turned off. On in the production parameter files; the Function App itself stays reachable from the internet (EHRs, browsers, Microsoft Graph).')
param privateNetworking bool = false

@description('Address space of the VNet (privateNetworking). The first /24 is the app subnet, the second the private endpoints.')
param vnetAddressPrefix string = '10.60.0.0/22'

@description('Address that receives the connector\'s alert mails (docs/operations.md, "Alerts"). Empty: alerts show in Azure Monitor only.')
param alertEmail string = ''

var envName = empty(environmentName) ? 'connector' : environmentName
var resourceToken = toLower(uniqueString(subscription().id, envName, region, location))
var tags = {
  'azd-env-name': envName
  'connector-region': region
  application: 'ehr-virtual-visit-connector'
}
var functionAppName = 'func-connector-${region}-${resourceToken}'
var deploymentContainerName = 'app-package-${take(resourceToken, 7)}'
// What the app uses in storage, so every role can be scoped to it (tests/infra checks these
// lists against connector_core: repositories' table kinds, connector_core/queues.py).
var connectorTableKinds = [
  'configs'
  'usermaps'
  'visits'
  'subs'
  'nonces'
  'keyring'
  'portalsessions'
  'reports'
]
var connectorTables = [for kind in connectorTableKinds: 'vv${region}${kind}']
var connectorQueues = [
  'presence-events'
  'presence-events-poison'
  'meeting-subscriptions'
  'meeting-subscriptions-poison'
]
var hostContainers = [
  'azure-webjobs-hosts'
  'azure-webjobs-secrets'
]
var vnetPrefixParts = split(split(vnetAddressPrefix, '/')[0], '.')
var vnetBase = '${vnetPrefixParts[0]}.${vnetPrefixParts[1]}'
var vnetThird = int(vnetPrefixParts[2])

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: !empty(resourceGroupName) ? resourceGroupName : (contains(envName, region) ? 'rg-${envName}' : 'rg-${envName}-${region}')
  location: location
  tags: tags
}

module identity 'core/security/managed-identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: 'id-connector-${region}-${resourceToken}'
    location: location
    tags: tags
  }
}

module monitoring 'core/monitor/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: 'log-connector-${region}-${resourceToken}'
    applicationInsightsName: 'appi-connector-${region}-${resourceToken}'
    location: location
    tags: tags
    retentionInDays: logRetentionInDays
  }
}

module storage 'core/storage/storage-account.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: 'st${resourceToken}'
    location: location
    tags: tags
    skuName: storageSkuName
    deploymentContainerName: deploymentContainerName
    privateNetworking: privateNetworking
    tableNames: connectorTables
    queueNames: connectorQueues
    hostContainerNames: hostContainers
    logAnalyticsWorkspaceId: monitoring.outputs.logAnalyticsWorkspaceId
  }
}

module keyVault 'core/security/key-vault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: 'kv${resourceToken}'
    location: location
    tags: tags
    logAnalyticsWorkspaceId: monitoring.outputs.logAnalyticsWorkspaceId
    privateNetworking: privateNetworking
  }
}

// --- private networking (privateNetworking) ------------------------------------------------------
module network 'core/network/virtual-network.bicep' = if (privateNetworking) {
  name: 'network'
  scope: rg
  params: {
    name: 'vnet-connector-${region}-${resourceToken}'
    location: location
    tags: tags
    addressPrefix: vnetAddressPrefix
    appSubnetPrefix: '${vnetBase}.${vnetThird}.0/24'
    privateEndpointSubnetPrefix: '${vnetBase}.${vnetThird + 1}.0/24'
  }
}

module storageBlobEndpoint 'core/network/private-endpoint.bicep' = if (privateNetworking) {
  name: 'pe-storage-blob'
  scope: rg
  params: {
    name: 'pe-st${resourceToken}-blob'
    location: location
    tags: tags
    serviceId: storage.outputs.id
    groupId: 'blob'
    subnetId: privateNetworking ? network.outputs.privateEndpointSubnetId : ''
    privateDnsZoneId: privateNetworking ? network.outputs.blobZoneId : ''
  }
}

module storageQueueEndpoint 'core/network/private-endpoint.bicep' = if (privateNetworking) {
  name: 'pe-storage-queue'
  scope: rg
  params: {
    name: 'pe-st${resourceToken}-queue'
    location: location
    tags: tags
    serviceId: storage.outputs.id
    groupId: 'queue'
    subnetId: privateNetworking ? network.outputs.privateEndpointSubnetId : ''
    privateDnsZoneId: privateNetworking ? network.outputs.queueZoneId : ''
  }
}

module storageTableEndpoint 'core/network/private-endpoint.bicep' = if (privateNetworking) {
  name: 'pe-storage-table'
  scope: rg
  params: {
    name: 'pe-st${resourceToken}-table'
    location: location
    tags: tags
    serviceId: storage.outputs.id
    groupId: 'table'
    subnetId: privateNetworking ? network.outputs.privateEndpointSubnetId : ''
    privateDnsZoneId: privateNetworking ? network.outputs.tableZoneId : ''
  }
}

module keyVaultEndpoint 'core/network/private-endpoint.bicep' = if (privateNetworking) {
  name: 'pe-keyvault'
  scope: rg
  params: {
    name: 'pe-kv${resourceToken}'
    location: location
    tags: tags
    serviceId: keyVault.outputs.id
    groupId: 'vault'
    subnetId: privateNetworking ? network.outputs.privateEndpointSubnetId : ''
    privateDnsZoneId: privateNetworking ? network.outputs.vaultZoneId : ''
  }
}

module rbac 'app/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    storageAccountName: storage.outputs.name
    keyVaultName: keyVault.outputs.name
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    appPrincipalId: identity.outputs.principalId
    tableNames: connectorTables
    queueNames: connectorQueues
    hostContainerNames: hostContainers
    deploymentContainerName: deploymentContainerName
    operatorPrincipalId: principalId
    operatorPrincipalType: principalType
    operatorQueueNames: connectorQueues
  }
}

module functionApp 'app/function-app.bicep' = {
  name: 'functionapp'
  scope: rg
  params: {
    name: functionAppName
    planName: 'plan-connector-${region}-${resourceToken}'
    location: location
    tags: tags
    region: region
    publicUrl: publicUrl
    portalUrl: portalUrl
    entraClientId: entraClientId
    entraApiAudience: entraApiAudience
    entraAuthorityHost: entraAuthorityHost
    graphBaseUrl: graphBaseUrl
    smartClientId: smartClientId
    allowedTenants: allowedTenants
    ehrPrivateTargets: ehrPrivateTargets
    retentionDays: retentionDays
    mappingRetentionDays: mappingRetentionDays
    reportRetentionDays: reportRetentionDays
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    deploymentContainerName: deploymentContainerName
    keyVaultName: keyVault.outputs.name
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    logAnalyticsWorkspaceId: monitoring.outputs.logAnalyticsWorkspaceId
    virtualNetworkSubnetId: privateNetworking ? network.outputs.appSubnetId : ''
  }
  // Role assignments and private endpoints first, so the app's first start can read Key Vault
  // and storage.
  dependsOn: [
    rbac
    storageBlobEndpoint
    storageQueueEndpoint
    storageTableEndpoint
    keyVaultEndpoint
  ]
}

module alerts 'core/monitor/alerts.bicep' = {
  name: 'alerts'
  scope: rg
  params: {
    location: location
    tags: tags
    namePrefix: 'connector-${region}'
    applicationInsightsId: monitoring.outputs.applicationInsightsId
    alertEmail: alertEmail
  }
}

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output CONNECTOR_REGION string = region
output CONNECTOR_PUBLIC_URL string = functionApp.outputs.publicUrl
output AZURE_FUNCTION_NAME string = functionApp.outputs.name
output SERVICE_API_NAME string = functionApp.outputs.name
output AZURE_KEY_VAULT_NAME string = keyVault.outputs.name
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output CONNECTOR_PRIVATE_NETWORKING bool = privateNetworking
