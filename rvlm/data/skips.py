"""Skip policy for bad input: skip and count per reason, or fail loudly (strict).

Where counts come from, so they are exact with any number of grain workers:
  * load time (main process, once per source build): LLaVA JSON parsing counts
    `bad_json`, `bad_record`, `empty_answer` and `missing_image`;
  * run time: preprocessing (possibly in a worker) never drops an example itself;
    it marks it with a reason code, and a filter stage that runs in the main
    process after `mp_prefetch` counts and drops it. `corrupt_image`, `too_long`
    and `truncated_turns` (a multi-turn record whose trailing turns did not fit:
    kept, with the fitting turns, and counted) are counted there, once per
    occurrence (an example met again in a later epoch counts again).
`skip_counts()` returns the totals of this process. With config.data.strict=True the
first bad input raises ValueError naming the file and the line (or record index).
"""
import collections
import threading

REASONS = ("bad_json", "bad_record", "empty_answer", "missing_image",
           "corrupt_image", "too_long", "truncated_turns")
# Reason codes carried by preprocessed examples; 0 = keep.
CODES = {r: k + 1 for k, r in enumerate(REASONS)}
# Kept but counted: the example is still used.
KEPT = ("truncated_turns",)

_lock = threading.Lock()
_counts = collections.Counter()


def count(reason: str, n: int = 1):
  if reason not in CODES:
    raise ValueError(f"unknown skip reason {reason!r}")
  with _lock:
    _counts[reason] += n


def skip_counts() -> dict:
  """Counts per reason (all reasons present, zeros included) in this process."""
  with _lock:
    return {r: int(_counts[r]) for r in REASONS}


def reset_skip_counts():
  with _lock:
    _counts.clear()


class BadInput(ValueError):
  """Raised under strict=True; the message names the file and line/record."""


def report(reason: str, where: str, detail: str, strict: bool):
  """Counts a load-time problem, or raises it when strict."""
  if strict:
    raise BadInput(f"{where}: {reason}: {detail}")
  count(reason)


class CountAndDrop:
  """Main-process filter after mp_prefetch: counts marked examples, drops skips."""

  def __call__(self, ex) -> bool:
    code = int(ex["skip"])
    if code == 0:
      return True
    reason = REASONS[code - 1]
    count(reason)
    return reason in KEPT
