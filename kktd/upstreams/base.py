"""The interface every upstream implements.

An upstream is one small module: it turns stored receipts into its own wire protocol and its answers into
the typed outcomes of kktd.delivery. It knows nothing of the database, the retry policy or the breaker: the
sync loop owns those, and records every outcome in the store before it asks for more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol, runtime_checkable

from kktd.delivery import AwaitingResult, Outgoing, PollOutcome, RegisterReport, Shift, SubmitOutcome


class Upstream(Protocol):
    """One upstream. ``submit`` and ``poll`` return one outcome per receipt, in order, and raise
    UpstreamUnavailable when no receipt of the call got an answer. Cancellation always propagates."""

    name: ClassVar[str]
    two_phase: ClassVar[bool]
    max_batch: int  # receipts per submit()/poll() call

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def submit(self, batch: Sequence[Outgoing]) -> list[SubmitOutcome]: ...

    async def poll(self, awaiting: Sequence[AwaitingResult]) -> list[PollOutcome]: ...


@runtime_checkable
class Register(Protocol):
    """An upstream that is a fiscal register kktd drives itself (a local device): the operator's shift commands
    and the register's own state go through the same single queue as the receipts. Other upstreams (a cloud
    register, an OFD) do not implement it and kktd answers that they have no shift of their own."""

    async def shift(self) -> Shift: ...

    async def open_shift(self) -> Shift: ...

    async def close_shift(self) -> Shift: ...  # the Z report

    async def report(self) -> RegisterReport: ...
