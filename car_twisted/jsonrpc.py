"""
A transport-neutral JSON-RPC 2.0 dispatcher.

It takes one text frame and a session and returns a Deferred firing with a
L{Reply}: the frame to send back (or None when nothing is owed) and whether
the connection must then be closed. Methods are called synchronously, in the
order their requests appear, so their effects keep arrival order; their
answers arrive whenever their Deferreds fire.
"""

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from twisted.internet.defer import gatherResults, maybeDeferred, succeed
from twisted.logger import Logger

from car_twisted.errors import InvalidParams, InvalidRequest, MethodNotFound, RPCError

log = Logger()

PARSE_ERROR = -32700
INTERNAL_ERROR = -32603

_NO_ID = object()


def encode(message) -> bytes:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def decode(payload: bytes):
    """Parse a frame; NaN and Infinity are not JSON and are refused."""
    return json.loads(payload, parse_constant=_reject_constant)


def notification(method: str, params: dict) -> bytes:
    """A server-to-client notification frame."""
    return encode({"jsonrpc": "2.0", "method": method, "params": params})


def error_response(id_, code: int, message: str) -> dict:
    return {"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": id_}


@dataclass(frozen=True)
class Reply:
    """What one frame is owed."""

    #: The response frame, or None when nothing is owed.
    frame: Optional[bytes]
    #: When set, close the connection with this code once C{frame} is sent.
    close_code: Optional[int] = None
    close_reason: Optional[str] = None


def _admit_all(session, method: str) -> None:
    """Every session may call every method."""


class Dispatcher:
    """
    Route JSON-RPC requests to methods.

    @param methods: wire name -> C{f(session, params: dict)} returning a
        result or a Deferred of one; it raises L{RPCError} to answer with an
        error.
    @param admit: C{f(session, method_name)}, called before each request
        (known method or not); it raises L{RPCError} to refuse it. An error
        with a C{close_code} also closes the connection.
    """

    def __init__(
        self,
        methods: Mapping[str, Callable[[Any, dict], Any]],
        admit: Callable[[Any, str], None] = _admit_all,
    ):
        self._methods = methods
        self._admit = admit

    def dispatch(self, session, payload: bytes):
        """
        Handle one text frame.

        @return: Deferred firing with a L{Reply}.
        """
        try:
            message = decode(payload)
        except (ValueError, RecursionError):
            return succeed(Reply(encode(error_response(None, PARSE_ERROR, "parse error: not valid JSON"))))
        closing = []  # the errors of this frame that close the connection
        if isinstance(message, list):
            if not message:
                return succeed(
                    Reply(encode(error_response(None, InvalidRequest.code, "invalid request: empty batch")))
                )
            answers = [self._handle(session, m, closing) for m in message]
            d = gatherResults(answers)
            d.addCallback(lambda rs: [r for r in rs if r is not None])
            d.addCallback(lambda rs: _reply(encode(rs) if rs else None, closing))
            return d
        d = self._handle(session, message, closing)
        d.addCallback(lambda r: _reply(None if r is None else encode(r), closing))
        return d

    def _handle(self, session, request, closing: list):
        """One request of a frame: a Deferred of its response dict, or None."""
        id_ = _request_id(request)
        try:
            name, params = _parse(request, id_)
        except InvalidRequest as e:
            return succeed(error_response(None if id_ is _NO_ID else id_, e.code, e.message))
        d = maybeDeferred(self._call, name, session, params)
        d.addErrback(_note_closing, closing)
        if id_ is _NO_ID:
            d.addCallbacks(lambda _: None, self._notification_failed)
            return d
        d.addCallbacks(
            lambda result: {"jsonrpc": "2.0", "result": result, "id": id_},
            lambda failure: self._error(failure, id_),
        )
        return d

    def _call(self, name, session, params):
        self._admit(session, name)
        method = self._methods.get(name)
        if method is None:
            raise MethodNotFound(f"method not found: {name[:100]}")
        if isinstance(params, list):
            raise InvalidParams("invalid params: params must be an object (named parameters)")
        return method(session, params)

    def _error(self, failure, id_) -> dict:
        if failure.check(RPCError):
            return error_response(id_, failure.value.code, failure.value.message)
        log.failure("request {id} failed", failure, id=id_)
        return error_response(id_, INTERNAL_ERROR, "internal error: the request could not be handled")

    def _notification_failed(self, failure) -> None:
        if not failure.check(RPCError):
            log.failure("notification failed", failure)


def _note_closing(failure, closing: list):
    if failure.check(RPCError) and failure.value.close_code is not None:
        closing.append(failure.value)
    return failure


def _reply(frame: Optional[bytes], closing: list) -> Reply:
    if not closing:
        return Reply(frame)
    return Reply(frame, closing[0].close_code, closing[0].message)


def _request_id(request) -> Optional[object]:
    """
    The request's id: L{_NO_ID} for a notification, None when absent-but-
    unreadable (or null), else the id.
    """
    if not isinstance(request, dict):
        return None
    if "id" not in request:
        return _NO_ID
    id_ = request["id"]
    if isinstance(id_, str) or (type(id_) is int):
        return id_
    return None


def _parse(request, id_):
    """The method name and params of a well-formed request object."""
    if not isinstance(request, dict):
        raise InvalidRequest("invalid request: expected a JSON-RPC request object")
    if id_ is None and request.get("id") is not None:
        raise InvalidRequest("invalid request: id must be a string, an integer or null")
    if request.get("jsonrpc") != "2.0":
        raise InvalidRequest('invalid request: "jsonrpc" must be exactly "2.0"')
    name = request.get("method")
    if not isinstance(name, str):
        raise InvalidRequest("invalid request: method must be a string")
    params = request.get("params", {})
    if not isinstance(params, (dict, list)):
        raise InvalidRequest("invalid request: params must be an object or an array")
    return name, params
