"""solapi-gateway: the auth-signing gateway in front of the SOLAPI API."""

__version__ = "0.2.0"
