"""modelherd.testing — real loopback origins and generated models, for testing a setup offline.

Everything here binds 127.0.0.1 only and needs the runtime dependencies only (no pytest, no numpy):

* :mod:`.hubserver` — a Hugging Face Hub (API host + CDN host, LFS redirects, ``Range``, paging, faults);
  ``python -m modelherd.testing.hubserver --repo org/model=/folder --print-port``;
* :mod:`.ociserver` — an OCI Object Storage (list, ``Range``, ``If-Match``, md5/crc32c, faults);
  ``python -m modelherd.testing.ociserver --bucket ns/bucket=/folder``;
* :mod:`.rangeserver` — a plain ``Range`` file server and a ``Source`` over it (engine tests);
* :mod:`.models` — deterministic Hugging Face-style safetensors models (shards + index + config.json);
* :mod:`.support` — ``parse_range``.

Submodules are imported on demand; importing this package loads nothing else.
"""
