"""Token ids → text increments for streamed replies: whole UTF-8 characters only, cut at the first stop string.

Exercised by `pytest tests/serve/test_server.py` (stop strings, streamed and not).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from recurchat.serve.scheduler import Job, SchedulerClosed


@dataclass
class TextStream:
    """Token ids → text increments for one reply: whole UTF-8 characters only, cut before the first stop string.

    Text that could still grow into a stop string is held back, so a streamed reply never shows part of one.
    """

    decode: Callable[[list[int]], str]
    stops: list[str]
    text: str = ""  # committed text (tokens whose bytes formed whole characters)
    tail: list[int] = field(default_factory=list)  # tokens that may end mid-character
    sent: int = 0  # characters of `text` handed out
    depths: list[int] = field(default_factory=list)  # every token taken, for usage
    unsent_depths: list[int] = field(default_factory=list)
    stopped: bool = False

    def push(self, token: int, depth: int) -> tuple[str, list[int]]:
        self.depths.append(depth)
        self.unsent_depths.append(depth)
        self.tail.append(token)
        piece = self.decode(self.tail)
        if not piece.endswith("\ufffd") or len(self.tail) >= 4:  # 4 bytes is the longest UTF-8 character
            self.text, self.tail = self.text + piece, []
        cut = min((i for s in self.stops if (i := self.text.find(s, self.sent)) >= 0), default=-1)
        if cut >= 0:
            self.text, self.tail, self.stopped = self.text[:cut], [], True
            return self._emit(cut, force=True)
        safe = len(self.text)
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), 0, -1):
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        return self._emit(safe)

    def flush(self) -> tuple[str, list[int]]:
        if self.tail:
            self.text, self.tail = self.text + self.decode(self.tail), []
        return self._emit(len(self.text), force=True)

    def _emit(self, upto: int, force: bool = False) -> tuple[str, list[int]]:
        if upto <= self.sent and not force:
            return "", []
        out, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        depths, self.unsent_depths = self.unsent_depths, []
        return out, depths

    def usage(self, prompt_tokens: int) -> dict:
        d = self.depths
        return {"prompt_tokens": prompt_tokens, "completion_tokens": len(d), "total_tokens": prompt_tokens + len(d),
                "mean_depth": round(sum(d) / len(d), 4) if d else 0.0, "max_depth": max(d, default=0)}


async def text_pieces(job: Job, ts: TextStream) -> AsyncIterator[tuple[str, list[int], str | None]]:
    """(text, depths of its tokens, finish_reason) from a job's events; the last one has a finish_reason."""
    while True:
        ev = await job.events.get()
        if isinstance(ev, BaseException):
            raise ev
        if ev.finish_reason == "cancelled":  # the server is shutting down (a gone client reads nothing)
            raise SchedulerClosed(f"generation was cancelled ({job.cancel_reason})")
        text, depths = ("", []) if ev.finish_reason == "stop" else ts.push(ev.token, ev.depth)
        if ts.stopped:
            job.cancel("stop")  # the stop string matched: free the engine row now
            yield text, depths, "stop"
            return
        if ev.finish_reason is None:
            if text:
                yield text, depths, None
            continue
        rest, more = ts.flush()
        yield text + rest, depths + more, ev.finish_reason
        return
