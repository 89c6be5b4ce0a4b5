"""``GET /ws``: one WebSocket to follow many jobs (and the tenant feed), resume, and cancel.

    endpoint   the route: credentials and stream caps checked before the upgrade (HTTP 4xx/503)
    session    one open socket: reader, writer, a pump per channel, the bounded send buffer
    source     a channel's events, exactly once: the event log, then the hub (the only module
               that knows the hub)
    frames     the frames, as pydantic models (parsed with them, published in /asyncapi.json)
    registry   the open sockets of the process, closed with 1012 on graceful shutdown

This package imports nothing at import time (services.py imports the registry).
"""

#: uvicorn options for every server that serves /ws. Per-message deflate is off: it costs ~50 KB
#: of zlib state per connection and event frames are small. Keep-alive is WebSocket ping/pong: a
#: peer that does not answer a ping within 20 s is closed (1011).
UVICORN_WS_OPTIONS: dict[str, object] = {
    "ws_per_message_deflate": False,
    "ws_ping_interval": 20.0,
    "ws_ping_timeout": 20.0,
    "ws_max_size": 1024 * 1024,
}
