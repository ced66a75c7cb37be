"""kktd: durable fiscal receipt intake and OFD forwarding for POS terminals."""

__version__ = "0.1.0"
