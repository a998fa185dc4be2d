"""The launch environment's error, shared by the rank discovery (distributed.py) and the device
rule (device.py), which the rank discovery calls: here so that neither imports the other for it."""


class LaunchEnvironmentError(RuntimeError):
    """The environment does not describe a distributed job consistently."""
