"""A real Ctrl-C (SIGINT) delivered at a chosen line of a function, for tests of what an interrupt there leaves."""
import signal
import sys
from types import CodeType
from typing import Callable, List


def body_lines(code: CodeType) -> List[int]:
    """The line numbers of a function's body (its ``def`` line excluded)."""
    return sorted({line for _, _, line in code.co_lines() if line and line > code.co_firstlineno})


def interrupted_at(code: CodeType, line: int, action: Callable[[], object]) -> bool:
    """Run ``action``, sending the process SIGINT when ``code`` first reaches ``line``; a KeyboardInterrupt it raises
    is caught. Whether the line was reached (and the signal sent)."""
    sent: List[int] = []

    def at_line(frame, event, arg):
        if event == "line" and frame.f_lineno == line and not sent:
            sent.append(line)
            signal.raise_signal(signal.SIGINT)
        return at_line

    sys.settrace(lambda frame, event, arg: at_line if frame.f_code is code else None)
    try:
        action()
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    return bool(sent)
