"""Secrets: named bundles of environment values, encrypted at rest, injected into sessions.

- A secret belongs to an org and is either the creating user's (scope "user", the default) or shared
  with the whole org (scope "org"; only org admins may create, replace or delete those). Names resolve
  user-scoped first, then org-scoped.
- Values are sealed with AES-256-GCM (api.credentials.secrets_box) and are never returned, logged or
  put in events or error messages; responses show names, keys and timestamps only.
- Injection: ``POST /v1/instances {secrets: [names]}`` resolves the names (a missing one fails the
  create before anything exists, naming it) and hands the union of their keys to the provider as
  ``ComputeSpec.secret_env``. The local provider passes them in the runner's environment (not its
  command line); Kubernetes puts them in a per-session Secret the pod reads with ``envFrom``.
- ``${NAME}`` references in ``.orz/cloud.yaml`` ``env`` are resolved by the runner, inside the session,
  against the secret environment variables it received (``RunnerSpec.secret_env`` lists their names):
  ``env: {GITHUB_TOKEN: ${GIT_TOKEN}}`` works when a requested secret has the key ``GIT_TOKEN``; a
  reference to a key no requested secret provides fails the session with that name. The API does
  nothing more than pass the keys, so the values never travel through the repository's config.
"""
