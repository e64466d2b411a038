"""leak-responder: makes a leaked Supermemory API key worthless within seconds."""

__version__ = "0.1.0"
