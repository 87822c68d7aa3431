// The connector's Function App on the Flex Consumption plan (Linux, Python 3.11), running as a
// user-assigned managed identity. App settings follow docs/design.md section 4 exactly; storage
// connections are identity-based and secrets are Key Vault references. With a subnet
// (virtualNetworkSubnetId, privateNetworking in main.bicep) its outbound traffic, storage and Key
// Vault included, goes through the VNet; inbound stays public (browsers, EHRs, Microsoft Graph).
// Function logs and metrics go to the Log Analytics workspace (FunctionAppLogs only).
param name string
param planName string
param location string = resourceGroup().location
param tags object = {}

@allowed([
  'americas'
  'emea'
  'apac'
])
param region string
param publicUrl string = ''
param portalUrl string = ''
param entraClientId string = ''
param entraApiAudience string = ''
param entraAuthorityHost string = 'https://login.microsoftonline.com'
param graphBaseUrl string = 'https://graph.microsoft.com'
param smartClientId string = ''
param allowedTenants string = ''
param ehrPrivateTargets string = ''
param retentionDays int = 7
param mappingRetentionDays int = 365
param reportRetentionDays int = 400

@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 100
@description('Always-ready instances for the HTTP trigger group (0: scale from zero).')
@minValue(0)
param alwaysReadyHttpInstances int = 0

@description('Concurrent HTTP requests per instance. The platform default for Python is 1; the clinician\'s visit page keeps one event-stream request (async, up to 25 s) in flight per open page, so an instance serves that many open pages and launches at once.')
@minValue(1)
@maxValue(1000)
param httpPerInstanceConcurrency int = 16
@description('Spread instances across availability zones (the platform then keeps at least two always-ready instances, billed). Use a zone-redundant storage SKU with it.')
param zoneRedundant bool = false

param identityId string
param identityClientId string
param storageAccountName string
param deploymentContainerName string
param keyVaultName string
param applicationInsightsName string
param logAnalyticsWorkspaceId string
@description('Subnet of the VNet integration (delegated to Microsoft.App/environments); empty: none.')
param virtualNetworkSubnetId string = ''

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  //checkov:skip=CKV_AZURE_225:Zone redundancy is the zoneRedundant parameter (off by default because it bills at least two always-ready instances); turn it on per region where availability needs it.
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    tier: 'FlexConsumption'
    name: 'FC1'
  }
  properties: {
    reserved: true
    zoneRedundant: zoneRedundant
  }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  //checkov:skip=CKV_AZURE_17:Client certificates cannot be required: browsers, EHRs and Microsoft Graph call the connector without them.
  //checkov:skip=CKV_AZURE_222:The connector must be reachable from the internet: EHR launches from clinicians' browsers, MyChart patients and Microsoft Graph notifications.
  //checkov:skip=CKV_AZURE_213:The platform health check (healthCheckPath) is not supported on Flex Consumption; monitor GET /api/health externally (e.g. an Application Insights availability test).
  //checkov:skip=CKV_AZURE_212:Flex Consumption scales out on demand; always-ready instances and zone redundancy are parameters (alwaysReadyHttpInstances, zoneRedundant) rather than a fixed worker count.
  name: name
  location: location
  tags: union(tags, {
    'azd-service-name': 'api'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    publicNetworkAccess: 'Enabled'
    keyVaultReferenceIdentity: identityId
    virtualNetworkSubnetId: empty(virtualNetworkSubnetId) ? null : virtualNetworkSubnetId
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      remoteDebuggingEnabled: false
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
        alwaysReady: alwaysReadyHttpInstances > 0 ? [
          {
            name: 'http'
            instanceCount: alwaysReadyHttpInstances
          }
        ] : []
        triggers: {
          http: {
            perInstanceConcurrency: httpPerInstanceConcurrency
          }
        }
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
}

// No FTP and no basic-auth publishing: deployments (azd deploy, func azure functionapp publish)
// authenticate with Entra ID.
resource ftpPolicy 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmPolicy 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'scm'
  properties: {
    allow: false
  }
}

// Function logs (the host's and the app's: FunctionAppLogs) and platform metrics. Deliberately
// not AppServiceHTTPLogs or the allLogs group: HTTP access logs record query strings, and the
// launch and sign-in callbacks carry code, state, launch and iss in theirs.
resource siteDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: site
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        category: 'FunctionAppLogs'
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

var effectivePublicUrl = empty(publicUrl) ? 'https://${site.properties.defaultHostName}' : publicUrl
var kvRef = 'VaultName=${vault.name}'

// The complete app setting set (this resource replaces all settings of the site).
// checkov evaluates its App Service checks on every Microsoft.Web/sites/config resource as if it
// were the 'web' config; for this 'appsettings' resource the ones below do not apply.
resource appSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  //checkov:skip=CKV_AZURE_13:Not applicable to app settings. The app needs anonymous routes (EHR launches, Graph webhooks, JWKS) and validates Entra tokens itself (docs/design.md section 5), so App Service Authentication stays off.
  //checkov:skip=CKV_AZURE_222:Not applicable to app settings; public access of the site is justified on the site resource (browsers, EHRs and Graph must reach it).
  //checkov:skip=CKV_AZURE_88:Not applicable: Azure Files is not used; Flex Consumption deploys from the blob container with the managed identity.
  //checkov:skip=CKV_AZURE_80:Not applicable: the app is Python 3.11, no .NET Framework.
  //checkov:skip=CKV_AZURE_63:Not applicable: App Service HTTP logs do not exist on Linux Flex Consumption; requests are logged to Application Insights.
  //checkov:skip=CKV_AZURE_65:Not applicable: detailed error pages are an IIS feature; errors go to Application Insights and users see problem+json or a short HTML page.
  //checkov:skip=CKV_AZURE_66:Not applicable: failed request tracing is an IIS feature absent on Linux Flex Consumption; Application Insights traces requests.
  parent: site
  name: 'appsettings'
  properties: {
    // docs/design.md section 4
    CONNECTOR_REGION: region
    CONNECTOR_PUBLIC_URL: effectivePublicUrl
    CONNECTOR_STORAGE__tableServiceUri: storage.properties.primaryEndpoints.table
    CONNECTOR_STORAGE__queueServiceUri: storage.properties.primaryEndpoints.queue
    CONNECTOR_STORAGE__credential: 'managedidentity'
    CONNECTOR_STORAGE__clientId: identityClientId
    CONNECTOR_SECRET_KEY: '@Microsoft.KeyVault(${kvRef};SecretName=connector-secret-key)'
    CONNECTOR_DEV_MODE: '0'
    CONNECTOR_PORTAL_URL: portalUrl
    CONNECTOR_ALLOWED_TENANTS: allowedTenants
    CONNECTOR_EHR_PRIVATE_TARGETS: ehrPrivateTargets
    CONNECTOR_RETENTION_DAYS: string(retentionDays)
    CONNECTOR_MAPPING_RETENTION_DAYS: string(mappingRetentionDays)
    CONNECTOR_REPORT_RETENTION_DAYS: string(reportRetentionDays)
    ENTRA_AUTHORITY_HOST: entraAuthorityHost
    ENTRA_CLIENT_ID: entraClientId
    ENTRA_CLIENT_SECRET: '@Microsoft.KeyVault(${kvRef};SecretName=entra-client-secret)'
    ENTRA_API_AUDIENCE: empty(entraApiAudience) ? 'api://${entraClientId}' : entraApiAudience
    GRAPH_BASE_URL: graphBaseUrl
    SMART_CLIENT_ID: smartClientId
    SMART_PRIVATE_KEY: '@Microsoft.KeyVault(${kvRef};SecretName=smart-private-key)'
    GRAPH_NOTIFICATION_CERT: '@Microsoft.KeyVault(${kvRef};SecretName=graph-notification-cert)'
    // Functions host storage, identity-based
    AzureWebJobsStorage__accountName: storage.name
    AzureWebJobsStorage__credential: 'managedidentity'
    AzureWebJobsStorage__clientId: identityClientId
    // Telemetry with Entra ID auth (local auth is disabled on Application Insights)
    APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsights.properties.ConnectionString
    APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
  }
}

output name string = site.name
output defaultHostName string = site.properties.defaultHostName
output publicUrl string = effectivePublicUrl
