"""One thin module per worker process, each a `Worker` over one domain folder of
`nanoclaw/`. The host names them in `nanoclaw.host.registry.WORKERS` and imports the one
a child runs after the fork. With `nanoclaw`, the only top-level package installed.
"""
