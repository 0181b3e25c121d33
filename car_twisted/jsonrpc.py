"""
A transport-neutral JSON-RPC 2.0 dispatcher.

It takes one text frame and a session and answers with a L{Reply}: the
frame to send back (or None when nothing is owed) and whether the connection
must then be closed. Methods are called synchronously, in the order their
requests appear, so their effects keep arrival order; their answers arrive
whenever their outcomes are known: in the same call when every method's is
(a value, or a Deferred that has already fired), else in a Deferred.

It enforces the JSON-RPC input limits of its L{WireLimits} (batch length,
nesting depth) and never answers with a frame larger than their message
size. This module is the daemon's one JSON codec for the wire.
"""

import json
from types import CoroutineType
from typing import Any, Callable, Mapping, NamedTuple, Optional

import orjson
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from car_twisted.errors import InvalidParams, InvalidRequest, MethodNotFound, RPCError
from car_twisted.limits import MAX_ID_CHARS, WireLimits
from car_twisted.outcomes import as_deferred, then

log = Logger()

PARSE_ERROR = -32700
INTERNAL_ERROR = -32603

_NO_ID = object()


def encode(message) -> bytes:
    """
    A message as compact UTF-8 JSON. Integers beyond 64 bits (which only
    records an older codec stored can hold) are written exactly by the
    standard library instead.
    """
    try:
        return orjson.dumps(message)
    except TypeError:
        return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()


def decode(payload: bytes):
    """
    Parse a frame. Refused as not JSON (ValueError): invalid UTF-8, lone
    surrogates, NaN and Infinity, numbers that overflow to infinity, and
    nesting past 1024 levels. Integers beyond 64 bits are read as
    floating-point numbers, as RFC 8259 (section 6) allows.
    """
    return orjson.loads(payload)


def notification(method: str, params: dict) -> bytes:
    """A server-to-client notification frame."""
    return encode({"jsonrpc": "2.0", "method": method, "params": params})


def error_response(id_, code: int, message: str, data=None) -> dict:
    error = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "error": error, "id": id_}


class Reply(NamedTuple):
    """What one frame is owed (a named tuple: one is made per frame)."""

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
        result, a Deferred of one or a coroutine; it raises (or fails with)
        L{RPCError} to answer with an error.
    @param admit: C{f(session, method_name)}, called before each request
        (known method or not); it raises L{RPCError} to refuse it. An error
        with a C{close_code} also closes the connection, and the requests
        after it in the same batch do not run: each is answered that error.
    @param limits: the batch length, nesting depth and message size it
        enforces.
    @param on_error: C{f(code)}, called for each error object it answers
        with (the metrics count them).
    """

    def __init__(
        self,
        methods: Mapping[str, Callable[[Any, dict], Any]],
        admit: Callable[[Any, str], None] = _admit_all,
        limits: WireLimits = WireLimits(),
        on_error: Callable[[int], None] = lambda code: None,
    ):
        self._methods = methods
        self._on_error = on_error
        self._admit = admit
        self._max_batch = limits.max_batch
        self._max_depth = limits.max_depth
        self._max_frame = limits.max_message_size
        self._parse_error = _error_reply(PARSE_ERROR, "parse error: not valid JSON")
        self._empty_batch = _error_reply(InvalidRequest.code, "invalid request: empty batch")
        self._long_batch = _error_reply(
            InvalidRequest.code,
            f"invalid request: a batch holds at most {limits.max_batch} requests; "
            "send the rest in another batch",
        )
        self._too_deep = (
            f"invalid request: arrays and objects nest deeper than {limits.max_depth} levels"
        )

    def dispatch(self, session, payload: bytes) -> Deferred:
        """
        Handle one text frame.

        @return: Deferred firing with a L{Reply}.
        """
        try:
            return as_deferred(self.answer(session, payload))
        except Exception:
            return fail()

    def answer(self, session, payload: bytes):
        """
        Handle one text frame, answering in this call when every method
        called has answered.

        @return: the L{Reply}, or a Deferred firing with it.
        """
        try:
            message = decode(payload)
        except ValueError:
            return self._refuse(self._parse_error, PARSE_ERROR)
        # A frame with few brackets cannot nest deeply: most frames skip the walk.
        if payload.count(b"[") + payload.count(b"{") > self._max_depth and _deeper_than(
            message, self._max_depth
        ):
            id_ = _request_id(message)
            if id_ is _NO_ID:
                return Reply(None)
            return self._refuse(
                Reply(encode(error_response(id_, InvalidRequest.code, self._too_deep))),
                InvalidRequest.code,
            )
        if not isinstance(message, list):
            return self._answer_request(session, message)
        if not message:
            return self._refuse(self._empty_batch, InvalidRequest.code)
        if len(message) > self._max_batch:
            return self._refuse(self._long_batch, InvalidRequest.code)
        closing = []  # the errors of this frame that close the connection
        answers = [self._handle(session, m, closing) for m in message]
        if any(isinstance(a, Deferred) for a in answers):
            d = gatherResults([as_deferred(a) for a in answers])
            d.addCallback(lambda rs: _reply(self._batch_frame(rs), closing))
            return d
        return _reply(self._batch_frame(answers), closing)

    def _answer_request(self, session, request):
        """
        A frame of one request (not a batch): L{_handle} and the frame in
        one step, without a closure when the method answers with a dict.
        """
        id_ = _request_id(request)
        try:
            name, params = _parse(request, id_)
        except InvalidRequest as e:
            self._on_error(e.code)
            return Reply(self._frame(error_response(None if id_ is _NO_ID else id_, e.code, e.message)))
        try:
            outcome = self._call(name, session, params)
        except BaseException:
            outcome = Failure()
        else:
            if type(outcome) is dict:  # the common case, known at once
                if id_ is _NO_ID:
                    return Reply(None)
                return Reply(self._frame({"jsonrpc": "2.0", "result": outcome, "id": id_}))
        closing = []
        answer = self._outcome(outcome, id_, closing)
        if isinstance(answer, Deferred):
            return answer.addCallback(lambda r: _reply(None if r is None else self._frame(r), closing))
        return _reply(None if answer is None else self._frame(answer), closing)

    def _refuse(self, reply: Reply, code: int) -> Reply:
        """Answer a whole frame with one error."""
        self._on_error(code)
        return reply

    def _frame(self, response: dict) -> bytes:
        """A response's frame, or an error in its place if it is too large."""
        frame = encode(response)
        if len(frame) > self._max_frame:
            return encode(self._too_large(response))
        return frame

    def _batch_frame(self, responses: list) -> Optional[bytes]:
        """
        A batch's answer; if it would be larger than a message, its largest
        responses are replaced by errors until it fits.
        """
        frames = [(encode(r), r) for r in responses if r is not None]
        if not frames:
            return None
        size = sum(len(f) for f, _ in frames) + len(frames) + 1
        if size > self._max_frame:
            for n in sorted(range(len(frames)), key=lambda n: -len(frames[n][0])):
                frame, response = frames[n]
                replacement = encode(self._too_large(response))
                frames[n] = (replacement, response)
                size -= len(frame) - len(replacement)
                if size <= self._max_frame:
                    break
        return b"[" + b",".join(f for f, _ in frames) + b"]"

    def _too_large(self, response: dict) -> dict:
        self._on_error(INTERNAL_ERROR)
        return error_response(
            response["id"],
            INTERNAL_ERROR,
            f"the answer would be larger than the {self._max_frame}-byte message limit; "
            "ask for less (a smaller limit, or one request per frame)",
        )

    def _handle(self, session, request, closing: list):
        """
        One request of a frame: its response dict (None for a
        notification), or a Deferred of it.
        """
        id_ = _request_id(request)
        try:
            name, params = _parse(request, id_)
        except InvalidRequest as e:
            self._on_error(e.code)
            return error_response(None if id_ is _NO_ID else id_, e.code, e.message)
        if closing:
            # An earlier request of the batch closes the connection: this
            # one does not run, and is refused with the same error.
            refusal = closing[0]
            return None if id_ is _NO_ID else error_response(id_, refusal.code, refusal.message)
        try:
            outcome = self._call(name, session, params)
        except BaseException:
            outcome = Failure()
        return self._outcome(outcome, id_, closing)

    def _outcome(self, outcome, id_, closing: list):
        """A called request's response dict (None for a notification), or a Deferred of it."""
        if id_ is _NO_ID:
            return then(outcome, _nothing, lambda failure: self._notification_failed(failure, closing))
        return then(
            outcome,
            lambda result: {"jsonrpc": "2.0", "result": result, "id": id_},
            lambda failure: self._error(failure, id_, closing),
        )

    def _call(self, name, session, params):
        self._admit(session, name)
        method = self._methods.get(name)
        if method is None:
            raise MethodNotFound(f"method not found: {name[:100]}")
        if isinstance(params, list):
            raise InvalidParams("invalid params: params must be an object (named parameters)")
        outcome = method(session, params)
        if type(outcome) is CoroutineType:
            return Deferred.fromCoroutine(outcome)
        return outcome

    def _error(self, failure, id_, closing: list) -> dict:
        self._on_error(failure.value.code if failure.check(RPCError) else INTERNAL_ERROR)
        if failure.check(RPCError):
            _note_closing(failure.value, closing)
            return error_response(id_, failure.value.code, failure.value.message, failure.value.data)
        log.failure("request {id} failed", failure, id=id_)
        return error_response(id_, INTERNAL_ERROR, "internal error: the request could not be handled")

    def _notification_failed(self, failure, closing: list) -> None:
        if failure.check(RPCError):
            _note_closing(failure.value, closing)
        else:
            log.failure("notification failed", failure)


def _error_reply(code: int, message: str) -> Reply:
    return Reply(encode(error_response(None, code, message)))


def _deeper_than(value, limit: int) -> bool:
    """Whether arrays and objects nest deeper than C{limit} in C{value}."""
    if not isinstance(value, (dict, list)):
        return False
    stack = [(value, 1)]
    while stack:
        container, depth = stack.pop()
        if depth > limit:
            return True
        for child in container.values() if isinstance(container, dict) else container:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def _note_closing(error: RPCError, closing: list) -> None:
    if error.close_code is not None:
        closing.append(error)


def _nothing(result) -> None:
    """A notification's result: nothing is owed."""


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
    if (isinstance(id_, str) and len(id_) <= MAX_ID_CHARS) or type(id_) is int:
        return id_
    return None


def _parse(request, id_):
    """The method name and params of a well-formed request object."""
    if not isinstance(request, dict):
        raise InvalidRequest("invalid request: expected a JSON-RPC request object")
    if id_ is None and request.get("id") is not None:
        raise InvalidRequest(
            f"invalid request: id must be a string of at most {MAX_ID_CHARS} characters, "
            "an integer or null"
        )
    if request.get("jsonrpc") != "2.0":
        raise InvalidRequest('invalid request: "jsonrpc" must be exactly "2.0"')
    name = request.get("method")
    if not isinstance(name, str):
        raise InvalidRequest("invalid request: method must be a string")
    params = request.get("params", {})
    if not isinstance(params, (dict, list)):
        raise InvalidRequest("invalid request: params must be an object or an array")
    return name, params
