"""Talking-head avatar engine: speech in, a lip-synced video of a chosen person out.

Nothing heavy is imported here; models and sessions load in constructors.
"""

__version__ = "0.2.0"
