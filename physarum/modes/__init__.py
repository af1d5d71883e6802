"""The job drivers, one per mode, each a short sequence of calls on service handles."""
