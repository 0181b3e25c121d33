"""What the daemon knows about one connected client."""

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass(eq=False)
class Session:
    """
    One WebSocket connection's identity and run state.

    C{notify(method, params)} pushes a JSON-RPC notification to the client.
    """

    client_id: str
    peer: str
    notify: Callable[[str, dict], None]
    agent_id: Optional[str] = None
    #: ``"agent"``, ``"host"`` or None.
    role: Optional[str] = None
    #: Whether a session.auth succeeded (with auth on).
    authenticated: bool = False
    #: session.auth calls refused for a token mismatch.
    auth_failures: int = 0
    capabilities: frozenset = frozenset()
    current_run_id: Optional[str] = None
    #: Ids of the open runs this session is producing.
    producing: set = field(default_factory=set)
    #: Ids of the runs this session follows live.
    following: set = field(default_factory=set)
