// User-assigned managed identity the Function App runs as. Every data-plane permission
// (storage, Key Vault, Application Insights) is granted to this identity in app/rbac.bicep.
param name string
param location string = resourceGroup().location
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output principalId string = identity.properties.principalId
output clientId string = identity.properties.clientId
