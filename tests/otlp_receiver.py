"""
A local OTLP/HTTP receiver for tests: a C{twisted.web} resource that decodes
the protobuf trace requests sent to C{/v1/traces} and keeps their spans.
"""

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Site


class _Traces(Resource):
    isLeaf = True

    def __init__(self, spans):
        super().__init__()
        self._spans = spans

    def render_POST(self, request):
        message = ExportTraceServiceRequest.FromString(request.content.read())
        for resource_spans in message.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self._spans.append((resource_spans.resource, scope_spans.scope, span))
        request.setHeader(b"content-type", b"application/x-protobuf")
        return ExportTraceServiceResponse().SerializeToString()


class _TrackingSite(Site):
    """A site that can close every connection it accepted."""

    def __init__(self, resource):
        super().__init__(resource)
        self.channels = {}  # channel -> its transport

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        made, lost = channel.makeConnection, channel.connectionLost

        def make_connection(transport):
            self.channels[channel] = transport
            return made(transport)

        def connection_lost(reason):
            del self.channels[channel]
            channel.gone.callback(None)
            return lost(reason)

        channel.gone = Deferred()
        channel.makeConnection = make_connection
        channel.connectionLost = connection_lost
        return channel


class OTLPReceiver:
    """
    Spans received, as C{(resource, scope, span)} protobuf messages.
    C{await OTLPReceiver.listen(testcase)}; it stops when the test ends.
    """

    def __init__(self):
        self.spans = []
        root = Resource()
        v1 = Resource()
        root.putChild(b"v1", v1)
        v1.putChild(b"traces", _Traces(self.spans))
        self._site = _TrackingSite(root)
        self._port = None

    @classmethod
    async def listen(cls, testcase):
        receiver = cls()
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        receiver._port = await endpoint.listen(receiver._site)
        testcase.addCleanup(receiver.stop)
        return receiver

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port.getHost().port}"

    def by_trace(self, trace_id: bytes) -> list:
        return [span for _, _, span in self.spans if span.trace_id == trace_id]

    async def stop(self):
        await self._port.stopListening()
        for channel, transport in list(self._site.channels.items()):
            transport.abortConnection()
            await channel.gone
