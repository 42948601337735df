"""Alarm and event rules evaluated at the edge. Importing the package registers every rule type."""

from rules import base  # noqa: F401
