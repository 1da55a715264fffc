"""Record IDs and restore bodies, as the records API takes them."""

from __future__ import annotations

import json
import secrets
import string
from typing import Any

ID_ALPHABET = string.ascii_letters + string.digits


def random_id() -> str:
    """A well-formed record ID the sandbox has never heard of (it answers notFound)."""
    digits = "".join(secrets.choice(string.digits) for _ in range(16))
    return "CRMRC" + digits + "".join(secrets.choice(ID_ALPHABET) for _ in range(11))


def ids_body(ids: list[Any]) -> bytes:
    """A bulk request's body: ``{"recordIds": ids}``."""
    return json.dumps({"recordIds": ids}).encode()
