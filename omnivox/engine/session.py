"""A conversation: the LLM cache slot it holds between turns and how its next user turn must start."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from omnivox.engine.slots import SlotHandle

_session_ids = itertools.count()


@dataclass(eq=False)
class Session:
    slot: SlotHandle | None  # its row in the LLM cache pool (given by the engine loop at its first turn)
    capacity: int  # positions the session may use in total (prompt + replies)
    length: int = 0  # positions already in the cache (host mirror; never read back from the GPU)
    system_prompted: bool = False
    last_reply_terminated: bool = True
    turns: int = 0
    busy: bool = False  # a request is using it now (one turn at a time)
    owned_by_request: bool = False  # made for one request and closed with it
    closed: bool = False
    id: str = field(default_factory=lambda: f"s{next(_session_ids)}")
