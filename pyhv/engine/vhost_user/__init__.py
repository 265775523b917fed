"""vhost-user: pyhv's virtio devices served to another VMM over a unix socket.

``message`` is the protocol (sans-I/O), ``connection`` the socket layer
(SCM_RIGHTS), ``backend`` the device side, ``blk`` the ``pyhv vhost-user-blk``
program.
"""
