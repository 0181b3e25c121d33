"""
``server.handshake``: the protocol version check and capability negotiation.

Without a handshake a session has no optional capability.
"""

from car_twisted import __version__
from car_twisted.errors import CapabilityMismatch, InvalidParams, ProtocolMismatch
from car_twisted.session import Session

PROTOCOL_VERSION = 3

KNOWN_CAPABILITIES = frozenset({"runs.cancel.v1", "runs.resume.v1", "runs.pagination.v1"})

#: More capability names than any client has a reason to send.
_MAX_CAPABILITIES = 64
_MAX_NAME = 128


def handshake(session: Session, params: dict) -> dict:
    """
    Agree on the protocol version and the session's capabilities: every
    known one the client asks for, required or optional.
    """
    version = params.get("protocol_version")
    if version is None:
        raise InvalidParams(f"invalid params: protocol_version is required (send {PROTOCOL_VERSION})")
    if type(version) is not int:
        raise InvalidParams("invalid params: protocol_version must be an integer")
    if version != PROTOCOL_VERSION:
        raise ProtocolMismatch(
            f"protocol version mismatch: this daemon speaks version {PROTOCOL_VERSION}, "
            f"not {version}"
        )
    client_version = params.get("client_version")
    if client_version is not None and not isinstance(client_version, str):
        raise InvalidParams("invalid params: client_version must be a string")
    required = _capabilities(params, "required_capabilities")
    optional = _capabilities(params, "optional_capabilities")
    unknown = sorted(required - KNOWN_CAPABILITIES)
    if unknown:
        raise CapabilityMismatch(
            "capability mismatch: this daemon does not offer "
            + ", ".join(repr(name) for name in unknown)
            + "; it offers "
            + ", ".join(sorted(KNOWN_CAPABILITIES))
        )
    session.capabilities = frozenset((required | optional) & KNOWN_CAPABILITIES)
    return {
        "protocol_version": PROTOCOL_VERSION,
        "server_version": __version__,
        "negotiated_capabilities": sorted(session.capabilities),
    }


def _capabilities(params: dict, name: str) -> frozenset:
    value = params.get(name)
    if value is None:
        return frozenset()
    if not (
        isinstance(value, list)
        and len(value) <= _MAX_CAPABILITIES
        and all(isinstance(c, str) and 0 < len(c) <= _MAX_NAME for c in value)
    ):
        raise InvalidParams(
            f"invalid params: {name} must be a list of at most {_MAX_CAPABILITIES} "
            "capability names"
        )
    return frozenset(value)
