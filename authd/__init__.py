"""authd: verify identity-aware-proxy JWTs for nginx auth_request."""

__version__ = "0.1.0"
