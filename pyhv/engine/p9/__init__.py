"""9P2000.L: the protocol as a sans-I/O module and a filesystem server behind it.

``protocol`` frames, encodes and decodes messages and negotiates ``msize``;
``server`` answers them from a directory tree confined beneath an export root;
``serve`` is the thin socket layer behind ``pyhv 9p-serve``.
"""
