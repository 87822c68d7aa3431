// Log alerts of one regional deployment, over the connector's telemetry in Application Insights.
// Each rule names the log event it watches; docs/operations.md ("Alerts") says what each means
// and what to do. With alertEmail set, an action group mails that address; without it the
// alerts still fire and show in Azure Monitor.
param location string = resourceGroup().location
param tags object = {}
param namePrefix string
param applicationInsightsId string
@description('Address that receives alert mails; empty: no action group.')
param alertEmail string = ''

var alerts = [
  {
    name: 'writeback-poisoned'
    severity: 1
    window: 'PT15M'
    threshold: 0
    description: 'A presence write-back exhausted its retries (or a message could not be processed) and waits in presence-events-poison. Fix the cause, then replay (docs/operations.md, "Poison queues").'
    query: 'traces | where message startswith "presence.writeback.poisoned" or message startswith "presence.message.poisoned"'
  }
  {
    name: 'storage-rejected'
    severity: 1
    window: 'PT15M'
    threshold: 0
    description: 'Storage refused the app (403 and alike), typically a table or queue the code uses that has no role assignment (infra/main.bicep connectorTableKinds, connectorQueues) or a network path that is closed. The events wait in the poison queue.'
    query: 'traces | where message startswith "presence.storage.rejected"'
  }
  {
    name: 'subscription-poisoned'
    severity: 2
    window: 'PT15M'
    threshold: 0
    description: 'Creating a Graph subscription for a meeting failed for good; the message waits in meeting-subscriptions-poison and that visit gets no presence events (docs/operations.md, "Poison queues").'
    query: 'traces | where message startswith "subscription.poisoned"'
  }
  {
    name: 'key-rotation-mismatch'
    severity: 2
    window: 'PT15M'
    threshold: 0
    description: 'An instance met state sealed with a CONNECTOR_SECRET_KEY key it does not list, or cannot open the identifier key. Expected for minutes during a one-step rotation; otherwise an instance runs an outdated key list (docs/operations.md, "Rotating CONNECTOR_SECRET_KEY").'
    query: 'traces | where message startswith "keys.unknown_key_id" or message startswith "keys.identifier_key.unreadable" or (message startswith "request.failed" and message has "error=UnknownKeyError")'
  }
  {
    name: 'settings-invalid'
    severity: 1
    window: 'PT15M'
    threshold: 0
    description: 'The connector refused its settings (a missing or invalid app setting, an unresolved Key Vault reference): every request fails. The log line names the setting.'
    query: 'traces | where message startswith "request.failed" and message has "error=SettingsError"'
  }
  {
    name: 'crashes'
    severity: 2
    window: 'PT15M'
    threshold: 0
    description: 'Unhandled errors (bugs): users saw a generic error page or problem with a correlation id. Search the correlation id in the exception.'
    query: 'union (exceptions), (traces | where message startswith "request.crashed")'
  }
  {
    name: 'server-errors'
    severity: 2
    window: 'PT15M'
    threshold: 10
    description: 'More than 10 responses with status 5xx in 15 minutes: storage, the EHR, Entra or Graph failing, or a key rotation half done.'
    query: 'requests | where toint(resultCode) >= 500'
  }
  {
    name: 'graph-access-policy-missing'
    severity: 3
    window: 'PT1H'
    threshold: 0
    description: 'A customer tenant has no Teams application access policy covering a clinician: their launch was refused with the fix (infra/README.md, "Teams application access policy").'
    query: 'traces | where message startswith "graph.access_policy_missing"'
  }
  {
    name: 'writeback-failing'
    severity: 3
    window: 'PT30M'
    threshold: 20
    description: 'EHR write-backs keep failing and are being retried (the EHR or its token endpoint is down or refusing). They reach the poison queue after about 44 minutes.'
    query: 'traces | where message startswith "presence.writeback.failed" or message startswith "ehr.call_failed"'
  }
  {
    name: 'notifications-dropped'
    severity: 3
    window: 'PT15M'
    threshold: 20
    description: 'Graph notifications dropped (unknown subscription, wrong clientState or signature): forged traffic, or subscriptions this deployment no longer knows.'
    query: 'traces | where message startswith "presence.notification.dropped"'
  }
]

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {
  name: '${namePrefix}-operators'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'vvops'
    enabled: true
    emailReceivers: [
      {
        name: 'operators'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

resource rules 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = [for alert in alerts: {
  name: '${namePrefix}-${alert.name}'
  location: location
  tags: tags
  properties: {
    displayName: '${namePrefix}-${alert.name}'
    description: alert.description
    severity: alert.severity
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: alert.window
    scopes: [
      applicationInsightsId
    ]
    criteria: {
      allOf: [
        {
          query: alert.query
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: alert.threshold
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: empty(alertEmail) ? [] : [
        actionGroup.id
      ]
    }
  }
}]

output alertNames array = [for alert in alerts: '${namePrefix}-${alert.name}']
