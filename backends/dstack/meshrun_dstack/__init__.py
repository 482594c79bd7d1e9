"""meshrun's dstack backend: run meshrun jobs as dstack tasks on a dstack server's fleets and clouds.

    [backends.dstack]
    url = "http://127.0.0.1:3000"     # or taken from ~/.dstack/config.yml
    project = "main"
    token = "..."                      # or MESHRUN_DSTACK_TOKEN, or ~/.dstack/config.yml

See docs/backends/dstack.md. Importing this package is cheap: httpx and dstack's models load on use.
"""

from ._backend import DstackBackend

__all__ = ["DstackBackend"]
