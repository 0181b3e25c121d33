from twisted.application.service import ServiceMaker

car = ServiceMaker(
    "car-twisted",
    "car_twisted.tap",
    "CAR agent-run-tracing daemon (JSON-RPC 2.0 over WebSocket).",
    "car",
)
