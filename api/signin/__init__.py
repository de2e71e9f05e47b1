"""Sign-in with identity providers (OIDC issuers, GitHub OAuth apps): see docs/sign-in.md."""
