"""Progress of the long jobs in models/train (corpus builders, training, distillation) on stderr.

    from progress import Progress, clear_line, track

    with Progress(total_updates, "phase 1", unit="updates", done=resumed_at) as pr:
        while ...:
            ...
            pr.update(updates, note="loss 3.214")     # the position reached (or pr.advance(n))
    for name in track(files, "brown", unit="files"):  # an iterable, one step per item
        ...

On a terminal (stderr is a tty) one line is rewritten in place (\\r), at most
10 times a second:

    phase 1: 1234/15000 updates (8.2%)  1.52 updates/s  ETA 2:30:58  loss 3.214

Elsewhere (a log file, a pipe) it is line-based: nothing for a job shorter
than 2 s, then one line each time another 10 % is done (with the elapsed time),
so a log gets at most 10 lines per loop; a loop without a known total prints
nothing there. The scripts' own log lines call clear_line() first, so they
never share the terminal row with the progress line (which comes back at the
next update). The rate and the ETA count only this run's work (a resumed run
starts from `done`). Progress never changes what a loop computes. Standard
library only.
"""

import os
import sys
import time

TTY_INTERVAL_S = 0.1  # at most 10 redraws a second
LINES_AFTER_S = 2.0   # off a terminal, jobs shorter than this print nothing

_drawn = None  # the Progress whose line is on the terminal now


def clear_line():
    """Erase the progress line on the terminal, if one is drawn, so that the next output starts on a
    clean row. Call it before printing anything while a Progress is open."""
    if _drawn is not None:
        _drawn.clear()


def log(*parts):
    """One timestamped line on stdout ("HH:MM:SS parts..."), never on the row of a progress line."""
    clear_line()
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def fmt_time(s):
    """Seconds as m:ss or h:mm:ss ("--" when unknown)."""
    if s is None or not 0 <= s < 360000:
        return "--"
    t = int(s + 0.5)
    return "%d:%02d:%02d" % (t // 3600, t // 60 % 60, t % 60) if t >= 3600 else "%d:%02d" % (t // 60, t % 60)


def fmt_rate(r):
    """A rate with about three significant digits."""
    return "%.0f" % r if r >= 100 else "%.1f" % r if r >= 10 else "%.2f" % r


class Progress:
    """Progress of one loop: `total` steps (None: unknown) of `unit`, named `label`; `done` steps
    already done before this run (a resumed job)."""

    def __init__(self, total, label, unit="items", done=0, stream=None):
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.done = self.done0 = done
        self.t0 = time.monotonic()
        self.last = None   # when the terminal line was last drawn
        self.decile = -1   # the last 10 % step a log line reported
        self.closed = False
        self.note = ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def advance(self, n=1, note=None):
        """n more steps done."""
        self.update(self.done + n, note)

    def update(self, done, note=None):
        """The loop has reached step `done` (note, when given, is shown after the numbers)."""
        global _drawn
        self.done = done
        if note is not None:
            self.note = note
        if self.closed:
            return
        now = time.monotonic()
        end = self.total is not None and done >= self.total
        if self.tty:
            if not end and self.last is not None and now - self.last < TTY_INTERVAL_S:
                return
            line = self.line(now, with_elapsed=False)
            try:
                width = os.get_terminal_size(self.stream.fileno()).columns or 80
            except (OSError, ValueError, AttributeError):
                width = 80
            # one row: a wrapped line could not be rewritten with \r
            self.stream.write("\r" + line[: max(width - 1, 20)] + "\033[K")
            self.stream.flush()
            self.last = now
            _drawn = self
        elif self.total and now - self.t0 >= LINES_AFTER_S:
            decile = min(10, int(10 * done / self.total + 1e-9))
            if decile > self.decile:
                self.decile = decile
                self.stream.write(self.line(now, with_elapsed=True) + "\n")
                self.stream.flush()

    def line(self, now, with_elapsed):
        """The progress text at time now."""
        el = now - self.t0
        rate = (self.done - self.done0) / el if el > 0 else 0.0
        parts = ["%s: %d" % (self.label, self.done)]
        if self.total:
            parts[0] += "/%d %s (%.1f%%)" % (self.total, self.unit, 100.0 * self.done / self.total)
        else:
            parts[0] += " " + self.unit
        parts.append("%s %s/s" % (fmt_rate(rate), self.unit))
        if with_elapsed or not self.total:
            parts.append(fmt_time(el) + " elapsed")
        if self.total:
            left = max(self.total - self.done, 0)
            parts.append("ETA " + fmt_time(left / rate if rate > 0 else (0 if not left else None)))
        if self.note:
            parts.append(self.note)
        return "  ".join(parts)

    def clear(self):
        """Erase the terminal line (it comes back at the next update)."""
        global _drawn
        if self.tty and self.last is not None:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.last = None
        if _drawn is self:
            _drawn = None

    def close(self):
        """The loop is over: erase the terminal line; later updates print nothing."""
        self.clear()
        self.closed = True


def track(iterable, label, unit="items", total=None):
    """Yield the items of iterable, reporting one step per item (total: len(iterable) by default)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(total, label, unit) as pr:
        n = 0
        for item in iterable:
            pr.update(n)
            yield item
            n += 1
        pr.update(n)
