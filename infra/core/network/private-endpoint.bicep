// One private endpoint: a service's sub-resource (groupId: blob, queue, table or vault) gets an
// address in the private-endpoint subnet, registered in the service's private DNS zone.
param name string
param location string = resourceGroup().location
param tags object = {}
@description('Resource id of the storage account or Key Vault.')
param serviceId string
@allowed([
  'blob'
  'queue'
  'table'
  'vault'
])
param groupId string
param subnetId string
param privateDnsZoneId string

resource endpoint 'Microsoft.Network/privateEndpoints@2024-05-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    subnet: {
      id: subnetId
    }
    privateLinkServiceConnections: [
      {
        name: name
        properties: {
          privateLinkServiceId: serviceId
          groupIds: [
            groupId
          ]
        }
      }
    ]
  }
}

resource dnsGroup 'Microsoft.Network/privateEndpoints/privateDnsZoneGroups@2024-05-01' = {
  parent: endpoint
  name: 'default'
  properties: {
    privateDnsZoneConfigs: [
      {
        name: groupId
        properties: {
          privateDnsZoneId: privateDnsZoneId
        }
      }
    ]
  }
}

output id string = endpoint.id
