"""One TLS client context per process for every source's connection pool.

Invariant: the context is the standard library's default (system CA bundle, hostname checking, certificate
verification required) and nothing changes it after it is made: sources pass it to urllib3 as is and never load
other CAs or lower verification on it. Parsing the CA bundle costs ~20 ms of CPU, so a context per source meant
20 ms per pull; one per process costs it once. An ``SSLContext`` is safe to share between threads.
"""

from __future__ import annotations

import functools
import ssl


@functools.cache
def client_context() -> ssl.SSLContext:
    """The process's verifying TLS client context (made on first use)."""
    return ssl.create_default_context()
