"""The wire protocol, sans-I/O: framing, messages, authentication and the per-connection state
machine. Shared by the broker and the client; imports no asyncio and no sockets."""
