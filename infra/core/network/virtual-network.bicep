// Private networking of one regional deployment (main.bicep deploys it when privateNetworking is
// true): a virtual network with
//   - snet-app: the Function App's outbound VNet integration (Flex Consumption needs a subnet
//     delegated to Microsoft.App/environments, used for nothing else),
//   - snet-private-endpoints: the private endpoints of storage (blob, queue, table) and Key Vault,
// and the private DNS zones that make the services' public names resolve to those endpoints
// inside the network. Storage and Key Vault then turn public network access off.
param name string
param location string = resourceGroup().location
param tags object = {}

@description('Address space of the virtual network. Pick one that does not overlap networks you peer it with (for example an EHR reachable only privately, CONNECTOR_EHR_PRIVATE_TARGETS).')
param addressPrefix string = '10.60.0.0/22'
@description('Subnet of the Function App\'s VNet integration (at least /27; /24 leaves room to scale out).')
param appSubnetPrefix string = '10.60.0.0/24'
@description('Subnet of the private endpoints.')
param privateEndpointSubnetPrefix string = '10.60.1.0/24'

// Private DNS zones of the services behind private endpoints (sovereign clouds included), in the
// order of the zone outputs below: blob, queue, table, vault.
var storageSuffix = environment().suffixes.storage
var privateDnsZoneNames = [
  'privatelink.blob.${storageSuffix}'
  'privatelink.queue.${storageSuffix}'
  'privatelink.table.${storageSuffix}'
  'privatelink${replace(environment().suffixes.keyvaultDns, 'vault', 'vaultcore')}'
]

resource vnet 'Microsoft.Network/virtualNetworks@2024-05-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    addressSpace: {
      addressPrefixes: [
        addressPrefix
      ]
    }
    subnets: [
      {
        name: 'snet-app'
        properties: {
          addressPrefix: appSubnetPrefix
          delegations: [
            {
              name: 'flex-consumption'
              properties: {
                serviceName: 'Microsoft.App/environments'
              }
            }
          ]
          privateEndpointNetworkPolicies: 'Disabled'
          privateLinkServiceNetworkPolicies: 'Enabled'
        }
      }
      {
        name: 'snet-private-endpoints'
        properties: {
          addressPrefix: privateEndpointSubnetPrefix
          privateEndpointNetworkPolicies: 'Disabled'
          privateLinkServiceNetworkPolicies: 'Enabled'
        }
      }
    ]
  }
}

resource zones 'Microsoft.Network/privateDnsZones@2024-06-01' = [for zone in privateDnsZoneNames: {
  name: zone
  location: 'global'
  tags: tags
}]

resource zoneLinks 'Microsoft.Network/privateDnsZones/virtualNetworkLinks@2024-06-01' = [for (zone, i) in privateDnsZoneNames: {
  parent: zones[i]
  name: '${name}-link'
  location: 'global'
  tags: tags
  properties: {
    registrationEnabled: false
    virtualNetwork: {
      id: vnet.id
    }
  }
}]

output id string = vnet.id
output appSubnetId string = vnet.properties.subnets[0].id
output privateEndpointSubnetId string = vnet.properties.subnets[1].id
output blobZoneId string = zones[0].id
output queueZoneId string = zones[1].id
output tableZoneId string = zones[2].id
output vaultZoneId string = zones[3].id
