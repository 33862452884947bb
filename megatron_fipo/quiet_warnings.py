"""Third-party warnings that tell a user of megatron-fipo nothing, filtered precisely in one place.

Each filter names the category, the message (a regex anchored at its start, as ``warnings`` does)
and the module the warning is attributed to, so anything else those libraries say, and every
warning of ours, still shows. ``install()`` is idempotent (``warnings`` keeps one copy of a filter)
and cheap; the code that drives the libraries concerned calls it (the CPU engine and the CPU server's batcher,
when built).
"""
from __future__ import annotations

import warnings

# (category, message regex, module regex, why it says nothing to the user)
FILTERS = (
    # transformers 5 renamed the forward's cache argument; the CPU engine passes past_key_values, which
    # still works; the warning is attributed to torch's Module.__call__ that forwarded it.
    (FutureWarning, r"`past_key_values` is deprecated and will be removed", r"torch\.nn\.modules\.module",
     "transformers' rename of the cache argument, once per generation"),
)


def install() -> None:
    """Add the filters (adding one twice keeps one copy)."""
    for category, message, module, _why in FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
