"""Transports: each in its own package behind the Protocols of :mod:`.base`."""
