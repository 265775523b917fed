"""Regenerate ``_ffi.py``, cffi's pre-parsed form of :data:`abi.CDEF`.

cffi's out-of-line ABI mode turns the C declarations into a small Python
module at build time, so starting a VM does not spend ~80 ms parsing C.
``tests/test_kvm_abi.py`` fails when ``_ffi.py`` is stale; run
``python -m pyhv.engine.kvm.build_ffi`` after changing ``abi.CDEF``.
"""

from __future__ import annotations

import os
import sys
import tempfile

from pyhv.engine.kvm import abi


def generate() -> str:
    """The text of the generated module."""
    import cffi

    builder = cffi.FFI()
    builder.cdef(abi.CDEF)
    builder.set_source("_ffi", None)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "_ffi.py")
        builder.emit_python_code(path)
        with open(path) as f:
            body = f.read()
    return ("# Generated from pyhv/engine/kvm/abi.py by "
            "`python -m pyhv.engine.kvm.build_ffi`; do not edit.\n" + body)


def target() -> str:
    return os.path.join(os.path.dirname(__file__), "_ffi.py")


def main() -> int:
    text = generate()
    with open(target(), "w") as f:
        f.write(text)
    print(f"wrote {target()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
