"""Every name pattern the gateway checks, in one place.

A name read from config or policy, one sent by a caller (a trusted principal
header, an internal key in an HMAC header, an ``X-Request-ID``) and one given on
the command line are all checked against the same pattern here, so the three
can never disagree about what a valid name is.

All patterns are used with ``fullmatch``.
"""

from __future__ import annotations

import re
from typing import Final

# A SOLAPI API key, the gateway's own or an internal one (``hmac_key``).
API_KEY: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")
API_KEY_RULE: Final = "letters, digits, _ and - only"

# A principal: a policy ``name``, or a name vouched for by trusted headers
# (``:`` allows namespaced names such as ``team:billing``).
PRINCIPAL: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")
PRINCIPAL_RULE: Final = "a name is letters, digits and ._@:- (up to 128)"

# A role of the policy's ``roles`` list.
ROLE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
ROLE_RULE: Final = "a role is a letter then letters, digits, _ or -"

# A route's or a limit's name: also a metrics label value.
ROUTE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ROUTE_NAME_RULE: Final = "a route name is letters, digits and ._-"
LIMIT_NAME_RULE: Final = "a limit name is letters, digits and ._- (up to 64)"

# An HTTP header name as the gateway accepts it in config (a subset of RFC 9110 tokens).
HEADER_NAME: Final = re.compile(r"[A-Za-z0-9-]{1,64}")
HEADER_NAME_RULE: Final = "not a valid header name"

# A bearer token's SHA-256, as ``token_sha256`` holds it.
SHA256_HEX: Final = re.compile(r"[0-9a-fA-F]{64}")
SHA256_HEX_RULE: Final = "must be 64 hex digits (SHA-256)"

# A caller's X-Request-ID, kept only when it matches.
REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")

# A tracing ``service_name`` (OpenTelemetry's service.name).
SERVICE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,63}")
SERVICE_NAME_RULE: Final = "a service name is letters, digits and ._/- (up to 64)"

# A W3C ``traceparent``: version, trace id, parent span id, flags (lower-case hex).
# Version ff is invalid; a later version may add fields after a dash.
TRACEPARENT: Final = re.compile(
    r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}(-[ -~]*)?"
)
# A W3C ``tracestate``, passed on only with a valid traceparent and only this long.
TRACESTATE_MAX: Final = 512

# A query parameter's name in a route's ``query:``. Matched against the raw query,
# never decoded, so it holds nothing a reader might decode or split on (%, +, &, =, ;).
QUERY_NAME: Final = re.compile(r"[A-Za-z0-9._~\[\]-]{1,64}")
QUERY_NAME_RULE: Final = "a query parameter name is letters, digits and ._~-[] (up to 64)"

# A ``{name}`` placeholder segment of a route path.
PLACEHOLDER: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

# The methods a route may name.
METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
