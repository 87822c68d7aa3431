// A strict, independent SMART authorization server + a small FHIR R4 API, for conformance tests.
//
// The authorization server is `oidc-provider` (panva, OpenID Certified), mounted at
// https://127.0.0.1:{port}/oauth2 (the issuer). The FHIR API lives at a DIFFERENT URL,
// https://127.0.0.1:{port}/fhir/r4, as at Epic and most SMART EHRs. Everything is served over
// HTTPS from one process bound to 127.0.0.1 only.
//
// Strictness (what a certified server does and our own stand-in might not):
//   * PKCE required on every authorization request, S256 only (oidc-provider 9 knows no other);
//   * client authentication private_key_jwt only, RS384 only; the client's keys come from the
//     connector's jwks_uri; assertions: iss = sub = client_id, aud = the token endpoint,
//     exp at most 5 minutes ahead, jti single use (oidc-provider's replay detection);
//   * exact redirect_uri matching, single-use authorization codes (a replayed code also revokes
//     what the first exchange issued), RFC 9207 `iss` in every authorization response;
//   * SMART: `aud` must be this FHIR base, `launch` must be a launch this server issued, the
//     `launch` scope needs a `launch` parameter; fhirUser (absolute URL) in the id_token; launch
//     context (patient, encounter, fhirContext) in the token response;
//   * SMART Backend Services: client_credentials with system/ scopes only; FHIR writes need such
//     a token, FHIR reads a user token whose scopes cover the resource.
//
// Usage (see devtools/conformance/__init__.py, which starts and stops it):
//   node server.mjs --cert leaf+chain.pem --key key.pem --connector http://127.0.0.1:7071 \
//        --data fixtures.json [--port 0] [--client-id vv-connector-local]
// Prints one JSON line {"ready": true, "port": N, ...} on stdout once it listens.
// Test control: /_control/* with header `X-Control-Token: $CONFORMANCE_CONTROL_TOKEN`.

import crypto from 'node:crypto';
import fs from 'node:fs';
import https from 'node:https';
import { parseArgs } from 'node:util';

import Provider, { errors, interactionPolicy } from 'oidc-provider';

// --- arguments ---------------------------------------------------------------------------------

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    cert: { type: 'string' },
    key: { type: 'string' },
    connector: { type: 'string' },
    data: { type: 'string' },
    'client-id': { type: 'string', default: 'vv-connector-local' },
  },
});
for (const required of ['cert', 'key', 'connector', 'data']) {
  if (!args[required]) {
    process.stderr.write(`conformance server: --${required} is required\n`);
    process.exit(2);
  }
}
const CONTROL_TOKEN = process.env.CONFORMANCE_CONTROL_TOKEN || '';
if (CONTROL_TOKEN.length < 16) {
  process.stderr.write('conformance server: CONFORMANCE_CONTROL_TOKEN (>= 16 chars) is required\n');
  process.exit(2);
}
const CONNECTOR = args.connector.replace(/\/+$/, '');
const CLIENT_ID = args['client-id'];
// A second registration of the connector whose only redirect URI is somewhere else: a config
// that uses it shows what happens when the redirect_uri sent is not registered.
const OTHER_REDIRECT_CLIENT_ID = `${CLIENT_ID}-other-redirect`;
const DATA = JSON.parse(fs.readFileSync(args.data, 'utf8'));
const RESOURCES = new Map(); // "Type/id" -> resource
for (const resource of DATA.resources || []) {
  RESOURCES.set(`${resource.resourceType}/${resource.id}`, resource);
}
const USERS = new Map(); // accountId ("Practitioner/x", "Patient/y") -> label shown on the login page
for (const user of DATA.users || []) USERS.set(user.id, user.label);

const MAX_BODY = 256 * 1024;
const LAUNCH_TTL_MS = 10 * 60 * 1000;
const READ_TYPES = new Set(['Patient', 'Practitioner', 'Appointment', 'Encounter']);
const LAUNCH_SCOPES = ['launch', 'launch/patient', 'launch/encounter'];
const USER_SCOPES = [];
for (const level of ['patient', 'user']) {
  for (const type of ['*', ...READ_TYPES]) {
    USER_SCOPES.push(`${level}/${type}.read`, `${level}/${type}.rs`);
  }
}
const SYSTEM_SCOPES = ['system/AuditEvent.write', 'system/AuditEvent.c', 'system/AuditEvent.cud'];
const AUDIT_WRITE = new Set([...SYSTEM_SCOPES, 'system/*.write', 'system/*.c', 'system/*.cud']);

// --- mutable test state ------------------------------------------------------------------------

const state = {
  launches: new Map(), // launch value -> { user, patient, encounter, appointment, conference, deny, expiresAt }
  codeContext: new Map(), // authorization code jti -> launch context (null for standalone)
  discoveryOverrides: {}, // merged into smart-configuration (the "bad modes")
  omitNonce: false, // drop `nonce` from authorization requests before oidc-provider sees them
  auditEvents: [], // { id, resource, clientId, scope, receivedAt }
  tokenRequests: [], // { grantType, clientId, authMethod, status, error }
  authorizeRequests: [], // { clientId, scope, aud, launch: bool, redirectUri }
  fhirRequests: [], // { method, path, status }
};

function resetState() {
  state.discoveryOverrides = {};
  state.omitNonce = false;
  state.auditEvents = [];
  state.tokenRequests = [];
  state.authorizeRequests = [];
  state.fhirRequests = [];
}

// --- small helpers -----------------------------------------------------------------------------

function escapeHtml(value) {
  return String(value).replace(/[&<>"']/g, (c) => ({
    '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
  }[c]));
}

function send(res, status, body, type = 'application/json', headers = {}) {
  const text = typeof body === 'string' ? body : JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': type,
    'Cache-Control': 'no-store',
    'Content-Length': Buffer.byteLength(text),
    ...headers,
  });
  res.end(text);
}

function page(res, status, title, bodyHtml) {
  send(
    res,
    status,
    `<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>${escapeHtml(title)}</title>`
      + `</head><body><h1>${escapeHtml(title)}</h1>${bodyHtml}</body></html>`,
    'text/html; charset=utf-8',
  );
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY) {
        reject(Object.assign(new Error('body too large'), { status: 413 }));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

async function readJson(req) {
  const text = await readBody(req);
  if (!text) return {};
  try {
    return JSON.parse(text);
  } catch {
    throw Object.assign(new Error('body is not JSON'), { status: 400 });
  }
}

function outcome(severity, code, diagnostics) {
  return {
    resourceType: 'OperationOutcome',
    issue: [{ severity, code, diagnostics }],
  };
}

function bearer(req) {
  const header = req.headers.authorization || '';
  const match = /^Bearer ([A-Za-z0-9._~+/=-]+)$/.exec(header);
  return match ? match[1] : null;
}

function rsaSigningJwk() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: crypto.randomBytes(8).toString('hex'), use: 'sig', alg: 'RS256' };
}

// --- the server (listen first: the issuer needs the port) --------------------------------------

let handler = (req, res) => send(res, 503, { error: 'starting' });
const server = https.createServer(
  { cert: fs.readFileSync(args.cert), key: fs.readFileSync(args.key) },
  (req, res) => handler(req, res),
);
server.keepAliveTimeout = 5000;
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(Number(args.port), '127.0.0.1', resolve);
});
const PORT = server.address().port;
const ORIGIN = `https://127.0.0.1:${PORT}`;
const ISSUER = `${ORIGIN}/oauth2`;
const FHIR_BASE = `${ORIGIN}/fhir/r4`;

// --- oidc-provider -----------------------------------------------------------------------------

const { Check, base: basePolicy } = interactionPolicy;
const policy = basePolicy();
// An EHR launch names its user: a browser signed in as someone else signs in again.
policy.get('login').checks.add(
  new Check('launch_user', 'the launch belongs to another user', (ctx) => {
    const launch = state.launches.get(ctx.oidc.params.launch);
    if (launch && ctx.oidc.session.accountId !== launch.user) {
      return Check.REQUEST_PROMPT;
    }
    return Check.NO_NEED_TO_PROMPT;
  }),
);

function launchContext(value) {
  const launch = state.launches.get(value);
  if (!launch || launch.expiresAt < Date.now()) return undefined;
  return launch;
}

function requestedScopes(ctx) {
  return new Set((ctx.oidc.params.scope || '').split(' ').filter(Boolean));
}

const CONNECTOR_JWKS_URI = new URL(`${CONNECTOR}/api/.well-known/jwks.json`).href;

const clientBase = {
  grant_types: ['authorization_code', 'client_credentials'],
  response_types: ['code'],
  token_endpoint_auth_method: 'private_key_jwt',
  token_endpoint_auth_signing_alg: 'RS384',
  jwks_uri: CONNECTOR_JWKS_URI,
  id_token_signed_response_alg: 'RS256',
  scope: 'openid fhirUser',
};

const configuration = {
  clients: [
    {
      ...clientBase,
      client_id: CLIENT_ID,
      redirect_uris: [`${CONNECTOR}/api/launch/callback`, `${CONNECTOR}/api/ehr-signin/callback`],
    },
    {
      ...clientBase,
      client_id: OTHER_REDIRECT_CLIENT_ID,
      redirect_uris: [`${CONNECTOR}/api/not-the-connector/callback`],
    },
  ],
  // oidc-provider refuses to fetch from special-use addresses (loopback included: SSRF
  // protection in fetchRequest's dispatcher). The connector under test runs on loopback, so
  // exactly its jwks_uri is fetched without that dispatcher; every other URL keeps it.
  fetch(url, options) {
    if (String(url) === CONNECTOR_JWKS_URI) {
      const { dispatcher, ...rest } = options;
      return globalThis.fetch(url, rest);
    }
    return globalThis.fetch(url, options);
  },
  jwks: { keys: [rsaSigningJwk()] },
  cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
  // OIDC scopes; the SMART resource scopes belong to the FHIR server (getResourceServerInfo).
  scopes: ['openid'],
  claims: { openid: ['sub'], fhirUser: ['fhirUser'] },
  // SMART puts fhirUser in the id_token of a code flow; oidc-provider's default would keep
  // scope-requested claims for the userinfo endpoint only.
  conformIdTokenClaims: false,
  responseTypes: ['code'],
  clientAuthMethods: ['private_key_jwt'],
  enabledJWA: {
    clientAuthSigningAlgValues: ['RS384'],
    idTokenSigningAlgValues: ['RS256'],
  },
  pkce: { required: () => true },
  allowOmittingSingleRegisteredRedirectUri: false,
  extraParams: {
    // SMART: the FHIR server the app wants to use; must be this one.
    aud(ctx, value) {
      if (value === undefined) {
        throw new errors.InvalidRequest('the SMART aud parameter is required');
      }
      if (value !== FHIR_BASE) {
        throw new errors.InvalidRequest('aud does not name this FHIR server');
      }
    },
    // SMART EHR launch: an opaque value this server handed out, short-lived.
    launch(ctx, value) {
      const scopes = requestedScopes(ctx);
      if (value === undefined) {
        if (scopes.has('launch')) {
          throw new errors.InvalidRequest('the launch scope needs a launch parameter');
        }
        return;
      }
      if (!launchContext(value)) {
        throw new errors.InvalidRequest('unknown or expired launch');
      }
    },
  },
  async findAccount(ctx, id) {
    if (!USERS.has(id)) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, fhirUser: `${FHIR_BASE}/${id}` };
      },
    };
  },
  async extraTokenClaims(ctx, token) {
    // The launch's patient travels with the user's access token (FHIR compartment checks).
    const code = ctx.oidc.entities.AuthorizationCode;
    const launch = code ? state.codeContext.get(code.jti) : undefined;
    if (token.kind === 'AccessToken' && launch?.patient) {
      return { patient: launch.patient };
    }
    return undefined;
  },
  interactions: {
    policy,
    url: (ctx, interaction) => `/oauth2/interaction/${interaction.uid}`,
  },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    rpInitiatedLogout: { enabled: false },
    pushedAuthorizationRequests: { enabled: false },
    userinfo: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // SMART clients name the FHIR server with `aud`, not RFC 8707 `resource`.
      defaultResource: (ctx, client, oneOf) => oneOf || FHIR_BASE,
      useGrantedResource: () => true,
      getResourceServerInfo(ctx, indicator) {
        if (indicator !== FHIR_BASE) throw new errors.InvalidTarget();
        if (ctx.oidc.params.grant_type === 'client_credentials') {
          for (const scope of requestedScopes(ctx)) {
            if (!SYSTEM_SCOPES.includes(scope)) {
              throw new errors.InvalidScope('requested scope is not allowed', scope);
            }
          }
          return {
            scope: SYSTEM_SCOPES.join(' '),
            audience: FHIR_BASE,
            accessTokenFormat: 'opaque',
            accessTokenTTL: 300,
          };
        }
        return {
          scope: [...LAUNCH_SCOPES, ...USER_SCOPES].join(' '),
          audience: FHIR_BASE,
          accessTokenFormat: 'opaque',
          accessTokenTTL: 3600,
        };
      },
    },
  },
  // SMART Backend Services' assertion rules on top of RFC 7523 (oidc-provider checks iss,
  // aud among its own URLs, exp present, jti unique, the signature with the client's keys).
  async assertJwtClientAuthClaimsAndHeader(ctx, claims, header, client) {
    if (claims.sub !== client.clientId) {
      throw new errors.InvalidClientAuth('sub (JWT subject) must be the client_id');
    }
    const tokenEndpoint = ctx.oidc.urlFor('token');
    const audiences = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
    if (!audiences.includes(tokenEndpoint)) {
      throw new errors.InvalidClientAuth('aud must be the token endpoint URL');
    }
    if (claims.exp - Math.floor(Date.now() / 1000) > 300) {
      throw new errors.InvalidClientAuth('exp must be at most 5 minutes in the future');
    }
  },
  ttl: {
    AccessToken: 3600,
    AuthorizationCode: 60,
    ClientCredentials: 300,
    IdToken: 3600,
    Interaction: 600,
    Session: 3600,
    Grant: 3600,
  },
  async renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
      + '<title>Authorization server error</title></head><body>'
      + '<h1>The authorization server refused the request</h1>'
      + `<p class="oauth-error" data-error="${escapeHtml(out.error)}">${escapeHtml(out.error)}</p>`
      + `<p class="oauth-error-description">${escapeHtml(out.error_description || '')}</p>`
      + '</body></html>';
  },
};

const provider = new Provider(ISSUER, configuration);
provider.on('server_error', (ctx, error) => {
  process.stderr.write(`oidc-provider server_error: ${error?.stack || error}\n`);
});
// Why a request was refused (oidc-provider keeps it out of the response on purpose); tests read
// it from the recorded requests.
function errorDetail(error) {
  const parts = [error?.error_detail, error?.cause?.message, error?.cause?.cause?.message];
  return parts.filter(Boolean).join(': ') || undefined;
}
for (const event of ['grant.error', 'authorization.error']) {
  provider.on(event, (ctx, error) => {
    ctx.state.errorDetail = errorDetail(error);
    process.stderr.write(`${event}: ${error?.error} ${ctx.state.errorDetail || ''}\n`);
  });
}

provider.use(async (ctx, next) => {
  if (state.omitNonce && ctx.method === 'GET' && ctx.path === '/auth') {
    const query = { ...ctx.query };
    delete query.nonce;
    ctx.query = query;
  }
  await next();
  const route = ctx.oidc?.route;
  if (route === 'authorization') {
    const p = ctx.oidc.params || {};
    state.authorizeRequests.push({
      clientId: p.client_id,
      scope: p.scope,
      aud: p.aud,
      launch: p.launch !== undefined,
      redirectUri: p.redirect_uri,
      status: ctx.status,
      errorDetail: ctx.state.errorDetail,
    });
  }
  if ((route === 'authorization' || route === 'resume') && ctx.oidc.entities.AuthorizationCode) {
    const code = ctx.oidc.entities.AuthorizationCode;
    const launch = launchContext(ctx.oidc.params.launch);
    state.codeContext.set(code.jti, launch || null);
  }
  if (route === 'token') {
    const body = ctx.body && typeof ctx.body === 'object' ? ctx.body : {};
    state.tokenRequests.push({
      grantType: ctx.oidc.params?.grant_type,
      clientId: ctx.oidc.client?.clientId,
      authMethod: ctx.oidc.client?.clientAuthMethod,
      status: ctx.status,
      error: body.error,
      errorDescription: body.error_description,
      errorDetail: ctx.state.errorDetail,
    });
    const code = ctx.oidc.entities.AuthorizationCode;
    if (ctx.status === 200 && code && body.access_token) {
      const launch = state.codeContext.get(code.jti);
      if (launch && code.scopes.has('launch')) {
        body.patient = launch.patient;
        if (launch.encounter) body.encounter = launch.encounter;
        const fhirContext = [];
        if (launch.appointment) fhirContext.push({ reference: `Appointment/${launch.appointment}` });
        if (launch.conference) {
          fhirContext.push({
            identifier: { system: 'urn:ehr-virtual-visit:conference-id', value: launch.conference },
          });
        }
        body.fhirContext = fhirContext;
        body.need_patient_banner = false;
      }
    }
  }
});

const providerCallback = provider.callback();

// --- interactions (login + consent, the provider's own flow) -----------------------------------

async function interactionGet(req, res, uid) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) {
    page(res, 400, 'This sign-in page belongs to another sign-in', '');
    return;
  }
  const { prompt, params } = details;
  const launch = launchContext(params.launch);
  if (prompt.name === 'login') {
    if (launch) {
      if (launch.deny) {
        await provider.interactionFinished(
          req,
          res,
          { error: 'access_denied', error_description: 'the user declined' },
          { mergeWithLastSubmission: false },
        );
        return;
      }
      // In an EHR launch the user is already signed in to the EHR.
      await provider.interactionFinished(
        req,
        res,
        { login: { accountId: launch.user } },
        { mergeWithLastSubmission: false },
      );
      return;
    }
    const options = [...USERS.entries()]
      .map(([id, label]) => `<option value="${escapeHtml(id)}">${escapeHtml(label)}</option>`)
      .join('');
    page(
      res,
      200,
      'Sign in to the conformance EHR',
      `<form class="login" method="post" action="/oauth2/interaction/${escapeHtml(uid)}/login">`
        + `<label>User <select name="user">${options}</select></label>`
        + '<button type="submit">Sign in</button></form>',
    );
    return;
  }
  if (prompt.name === 'consent') {
    // The connector's client is pre-authorized by the EHR's administrators: consent is granted
    // for exactly what was requested and is still missing.
    const { details: missing } = prompt;
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: details.session.accountId, clientId: params.client_id });
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes || {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    const consent = details.grantId ? {} : { grantId };
    await provider.interactionFinished(req, res, { consent }, { mergeWithLastSubmission: true });
    return;
  }
  page(res, 400, `Unsupported prompt ${prompt.name}`, '');
}

async function interactionLogin(req, res, uid) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid || details.prompt.name !== 'login') {
    page(res, 400, 'This sign-in page belongs to another sign-in', '');
    return;
  }
  const form = new URLSearchParams(await readBody(req));
  const user = form.get('user');
  if (!user || !USERS.has(user)) {
    page(res, 400, 'Unknown user', '');
    return;
  }
  await provider.interactionFinished(
    req,
    res,
    { login: { accountId: user } },
    { mergeWithLastSubmission: false },
  );
}

// --- FHIR --------------------------------------------------------------------------------------

function smartConfiguration() {
  return {
    issuer: ISSUER,
    jwks_uri: provider.urlFor('jwks'),
    authorization_endpoint: provider.urlFor('authorization'),
    token_endpoint: provider.urlFor('token'),
    grant_types_supported: ['authorization_code', 'client_credentials'],
    response_types_supported: ['code'],
    scopes_supported: ['openid', 'fhirUser', ...LAUNCH_SCOPES, ...USER_SCOPES, ...SYSTEM_SCOPES],
    code_challenge_methods_supported: ['S256'],
    token_endpoint_auth_methods_supported: ['private_key_jwt'],
    token_endpoint_auth_signing_alg_values_supported: ['RS384'],
    authorization_response_iss_parameter_supported: true,
    capabilities: [
      'launch-ehr',
      'launch-standalone',
      'client-confidential-asymmetric',
      'context-ehr-patient',
      'context-ehr-encounter',
      'context-standalone-patient',
      'sso-openid-connect',
      'permission-patient',
      'permission-user',
      'permission-v1',
      'permission-v2',
    ],
    ...state.discoveryOverrides,
  };
}

function capabilityStatement() {
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: '2024-01-01',
    kind: 'instance',
    fhirVersion: '4.0.1',
    format: ['json'],
    implementation: { description: 'Conformance FHIR server', url: FHIR_BASE },
    rest: [
      {
        mode: 'server',
        security: {
          service: [
            {
              coding: [
                {
                  system: 'http://terminology.hl7.org/CodeSystem/restful-security-service',
                  code: 'SMART-on-FHIR',
                },
              ],
            },
          ],
          extension: [
            {
              url: 'http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris',
              extension: [
                { url: 'authorize', valueUri: provider.urlFor('authorization') },
                { url: 'token', valueUri: provider.urlFor('token') },
              ],
            },
          ],
        },
        resource: [
          ...[...READ_TYPES].map((type) => ({ type, interaction: [{ code: 'read' }] })),
          { type: 'AuditEvent', interaction: [{ code: 'create' }] },
        ],
      },
    ],
  };
}

function inPatientCompartment(resource, patientId) {
  const ref = `Patient/${patientId}`;
  switch (resource.resourceType) {
    case 'Patient':
      return resource.id === patientId;
    case 'Appointment':
      return (resource.participant || []).some((p) => p.actor?.reference === ref);
    case 'Encounter':
      return resource.subject?.reference === ref;
    default:
      return false;
  }
}

function scopeCovers(scopes, level, type) {
  return [`${level}/${type}.read`, `${level}/${type}.rs`, `${level}/*.read`, `${level}/*.rs`]
    .some((s) => scopes.has(s));
}

function unauthorized(res, description) {
  send(res, 401, outcome('error', 'login', description), 'application/fhir+json', {
    'WWW-Authenticate': `Bearer realm="${FHIR_BASE}", error="invalid_token"`,
  });
}

async function fhirRead(req, res, type, id) {
  const value = bearer(req);
  const token = value ? await provider.AccessToken.find(value) : undefined;
  if (!token || token.isExpired || token.aud !== FHIR_BASE) {
    unauthorized(res, 'a valid access token for this FHIR server is required');
    return;
  }
  const resource = RESOURCES.get(`${type}/${id}`);
  const scopes = token.scopes;
  const patient = token.extra?.patient;
  let allowed = scopeCovers(scopes, 'user', type);
  if (!allowed && scopeCovers(scopes, 'patient', type)) {
    const self = token.accountId === `Patient/${id}` && type === 'Patient';
    allowed = self || (resource && patient && inPatientCompartment(resource, patient));
    if (!resource && patient) allowed = true; // let the 404 below answer
  }
  if (!allowed) {
    send(res, 403, outcome('error', 'forbidden', 'the token does not cover this resource'),
      'application/fhir+json');
    return;
  }
  if (!resource) {
    send(res, 404, outcome('error', 'not-found', `${type}/${id} is not known`),
      'application/fhir+json');
    return;
  }
  send(res, 200, resource, 'application/fhir+json');
}

async function fhirCreateAuditEvent(req, res) {
  const value = bearer(req);
  const token = value ? await provider.ClientCredentials.find(value) : undefined;
  if (!token || token.isExpired || token.aud !== FHIR_BASE) {
    unauthorized(res, 'a SMART Backend Services access token for this FHIR server is required');
    return;
  }
  if (![...token.scopes].some((s) => AUDIT_WRITE.has(s))) {
    send(res, 403, outcome('error', 'forbidden', 'the token does not allow writing AuditEvent'),
      'application/fhir+json');
    return;
  }
  const contentType = (req.headers['content-type'] || '').split(';')[0].trim();
  if (!['application/fhir+json', 'application/json'].includes(contentType)) {
    send(res, 415, outcome('error', 'not-supported', 'send application/fhir+json'),
      'application/fhir+json');
    return;
  }
  const resource = await readJson(req);
  const problems = [];
  if (resource.resourceType !== 'AuditEvent') problems.push('resourceType must be AuditEvent');
  if (!resource.type?.code && !resource.type?.system) problems.push('type is required');
  if (typeof resource.recorded !== 'string') problems.push('recorded is required');
  if (!Array.isArray(resource.agent) || !resource.agent.length) problems.push('agent is required');
  if (!resource.source?.observer) problems.push('source.observer is required');
  if (problems.length) {
    send(res, 400, outcome('error', 'invalid', problems.join('; ')), 'application/fhir+json');
    return;
  }
  const id = crypto.randomUUID();
  const stored = { ...resource, id, meta: { versionId: '1', lastUpdated: new Date().toISOString() } };
  state.auditEvents.push({
    id,
    resource: stored,
    clientId: token.clientId,
    scope: token.scope,
    receivedAt: new Date().toISOString(),
  });
  send(res, 201, stored, 'application/fhir+json', {
    Location: `${FHIR_BASE}/AuditEvent/${id}/_history/1`,
  });
}

async function fhir(req, res, path) {
  const rest = path.slice('/fhir/r4'.length);
  if (req.method === 'GET' && rest === '/.well-known/smart-configuration') {
    send(res, 200, smartConfiguration());
    return;
  }
  if (req.method === 'GET' && rest === '/metadata') {
    send(res, 200, capabilityStatement(), 'application/fhir+json');
    return;
  }
  if (req.method === 'POST' && rest === '/AuditEvent') {
    await fhirCreateAuditEvent(req, res);
    return;
  }
  const match = /^\/([A-Za-z]+)\/([A-Za-z0-9.-]{1,64})$/.exec(rest);
  if (req.method === 'GET' && match && READ_TYPES.has(match[1])) {
    await fhirRead(req, res, match[1], match[2]);
    return;
  }
  send(res, 404, outcome('error', 'not-found', 'no such FHIR interaction here'),
    'application/fhir+json');
}

// --- test control ------------------------------------------------------------------------------

async function control(req, res, path) {
  const given = Buffer.from(String(req.headers['x-control-token'] || ''));
  const expected = Buffer.from(CONTROL_TOKEN);
  if (given.length !== expected.length || !crypto.timingSafeEqual(given, expected)) {
    send(res, 403, { error: 'control token required' });
    return;
  }
  const route = `${req.method} ${path}`;
  switch (route) {
    case 'POST /_control/launches': {
      const body = await readJson(req);
      if (!USERS.has(body.user)) {
        send(res, 400, { error: 'unknown user' });
        return;
      }
      const launch = crypto.randomBytes(24).toString('base64url');
      state.launches.set(launch, {
        user: body.user,
        patient: body.patient || undefined,
        encounter: body.encounter || undefined,
        appointment: body.appointment || undefined,
        conference: body.conference || undefined,
        deny: Boolean(body.deny),
        expiresAt: Date.now() + LAUNCH_TTL_MS,
      });
      send(res, 201, { launch });
      return;
    }
    case 'POST /_control/discovery':
      state.discoveryOverrides = { ...(await readJson(req)) };
      send(res, 200, smartConfiguration());
      return;
    case 'POST /_control/omit-nonce':
      state.omitNonce = Boolean((await readJson(req)).omit);
      send(res, 200, { omitNonce: state.omitNonce });
      return;
    case 'POST /_control/reset':
      resetState();
      send(res, 200, { reset: true });
      return;
    case 'GET /_control/audit-events':
      send(res, 200, state.auditEvents);
      return;
    case 'GET /_control/token-requests':
      send(res, 200, state.tokenRequests);
      return;
    case 'GET /_control/authorize-requests':
      send(res, 200, state.authorizeRequests);
      return;
    case 'GET /_control/fhir-requests':
      send(res, 200, state.fhirRequests);
      return;
    default:
      send(res, 404, { error: 'no such control route' });
  }
}

// --- routing -----------------------------------------------------------------------------------

handler = async (req, res) => {
  const path = new URL(req.url, ORIGIN).pathname;
  try {
    if (path === '/health') {
      send(res, 200, { status: 'ok', issuer: ISSUER, fhirBase: FHIR_BASE });
      return;
    }
    const interaction = /^\/oauth2\/interaction\/([A-Za-z0-9_-]+)(\/login)?$/.exec(path);
    if (interaction) {
      const [, uid, login] = interaction;
      if (req.method === 'GET' && !login) {
        await interactionGet(req, res, uid);
      } else if (req.method === 'POST' && login) {
        await interactionLogin(req, res, uid);
      } else {
        send(res, 405, { error: 'method not allowed' });
      }
      return;
    }
    if (path === '/oauth2' || path.startsWith('/oauth2/')) {
      // Mounted as express/koa-mount do: oidc-provider derives its mount path from originalUrl.
      req.originalUrl = req.url;
      req.url = req.url.slice('/oauth2'.length) || '/';
      providerCallback(req, res);
      return;
    }
    if (path.startsWith('/fhir/r4/') || path === '/fhir/r4') {
      res.on('finish', () => {
        state.fhirRequests.push({ method: req.method, path, status: res.statusCode });
      });
      await fhir(req, res, path);
      return;
    }
    if (path.startsWith('/_control/')) {
      await control(req, res, path);
      return;
    }
    send(res, 404, { error: 'not found' });
  } catch (error) {
    if (error instanceof errors.SessionNotFound) {
      page(res, 400, 'This sign-in has expired or was opened in another browser', '');
      return;
    }
    const status = error?.status && error.status < 500 ? error.status : 500;
    if (status === 500) process.stderr.write(`conformance server error: ${error?.stack || error}\n`);
    if (!res.headersSent) send(res, status, { error: String(error?.message || error) });
    else res.destroy();
  }
};

process.stdout.write(
  `${JSON.stringify({ ready: true, port: PORT, issuer: ISSUER, fhirBase: FHIR_BASE })}\n`,
);

function shutdown() {
  server.close();
  server.closeAllConnections?.();
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
// The parent (pytest) holds our stdin: when it goes away, so do we.
process.stdin.on('end', shutdown);
process.stdin.on('error', shutdown);
process.stdin.resume();
