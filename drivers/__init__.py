"""Southbound protocol drivers. Importing the package registers every driver type."""

from drivers import base  # noqa: F401
from drivers import modbus  # noqa: F401
from drivers import mqtt  # noqa: F401
from drivers import opcua  # noqa: F401
