"""What the daemon knows about one connected client."""

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass(eq=False, slots=True)
class Session:
    """
    One WebSocket connection's identity and run state.

    C{notify(method, params)} pushes a JSON-RPC notification to the client.
    Slotted, and its sets made on first use: thousands of idle sessions
    cost little (docs/performance.md).
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
    _producing: Optional[set] = field(default=None, init=False, repr=False)
    _following: Optional[set] = field(default=None, init=False, repr=False)

    @property
    def producing(self) -> set:
        """Ids of the open runs this session is producing."""
        if self._producing is None:
            self._producing = set()
        return self._producing

    @property
    def following(self) -> set:
        """Ids of the runs this session follows live."""
        if self._following is None:
            self._following = set()
        return self._following
