"""The Redis queue backend: `client.py` is the API side (`RedisBatcher`), `worker.py` the
`gansentry worker` loop, `protocol.py` what both say to each other (key names, entry
fields, payload encoding, Lua scripts). See docs/architecture.md, "Scaling out through
Redis"."""
