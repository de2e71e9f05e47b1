"""The Kubernetes provider: pure manifest builders (``manifests``), names, and the client (``provider``)."""
