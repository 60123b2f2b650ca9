"""The process device: what a process definition must be.

A process is defined by a message whose ``"device"`` is ``"process@1.0"``
and whose ``"execution-device"`` names a registered device; its ID is the
definition's `message_id`. Computing its slots is the driver's (`_driver`,
around the sans-I/O `_core`). Nothing here blocks.
"""

from __future__ import annotations

from ._devices import FAILURE_POLICIES, PROCESS_DEVICE, RECORD, Devices
from ._exceptions import InvalidMessage
from ._message import Message, freeze

__all__ = ["validate_definition"]


def validate_definition(definition: object, devices: Devices) -> Message:
    """Check a process definition and return it frozen.

    It must be a message whose ``"device"`` is ``"process@1.0"`` and whose
    ``"execution-device"`` names a registered device (`UnknownDevice` if not).
    An ``"on-failure"``, if given, is ``"stop"`` or ``"record"`` (the latter for
    live devices only).
    """
    msg = freeze(definition, what="definition")
    if msg.get("device") != PROCESS_DEVICE:
        raise InvalidMessage(
            f'definition: "device" must be {PROCESS_DEVICE!r}, not {msg.get("device")!r}'
        )
    name = msg.get("execution-device")
    if type(name) is not str:
        raise InvalidMessage('definition: "execution-device" must be a device name (str)')
    device = devices.get(name)
    policy = msg.get("on-failure")
    if policy is not None:
        if policy not in FAILURE_POLICIES:
            raise InvalidMessage(
                f'definition: "on-failure" must be "stop" or "record", not {policy!r}'
            )
        if policy == RECORD and not device.live:
            raise InvalidMessage(
                f'definition: "on-failure": "record" needs a live device; {name!r} is not one'
            )
    return msg
