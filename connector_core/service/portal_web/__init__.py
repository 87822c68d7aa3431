"""The configuration portal's web pages (docs/design.md section 5, "Configuration portal").

A backend-for-frontend served by the Function App at ``/api/portal``: server-rendered HTML
(Jinja2, autoescaped) over the same use cases as the JSON API (:mod:`connector_core.service.
configs`), Entra sign-in with msal (authorization code + PKCE), a sealed ``__Host-`` session
cookie over a server-side session record, CSRF tokens on every form, a strict
Content-Security-Policy, and message catalogs (Babel) in English, Brazilian Portuguese and
Spanish, which also serve the pages patients and clinicians see (waiting page, error pages).

Modules: ``web`` (framework-neutral request/response), ``i18n`` (locales and catalogs),
``render`` (templates), ``sessions`` (session record, cookies, CSRF), ``context`` (what every
page runs in: language, session, headers, CSRF checks, error pages), ``pages`` (one function per
route), ``records`` (integration records as each EHR's analyst enters them), ``public`` (the
patient's and clinician's pages). Jinja2 and Babel load on the first page, never at
``import function_app``.
"""
