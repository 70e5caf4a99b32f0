"""Data: the canonical event store and the adapters that build it (RED-MMU, reference json, events, synthetic)."""

from redrec.data.store import EventStore, EventStoreWriter, UserEvents

__all__ = ["EventStore", "EventStoreWriter", "UserEvents"]
