"""Addresses on a cluster: which IP a process serves on, and which interface holds it.

A server binds its node's IP as Ray sees it (`ray.util.get_node_ip_address()`), or
127.0.0.1 when the job is on an embedded Ray (one machine, nothing leaves it). gloo and
NCCL otherwise pick their interface from the hostname, which in a container or network
namespace resolves to an address peers cannot reach (or to nothing: "[c10d] The hostname
of the client socket cannot be retrieved"), so `pin_interface` names the interface that
holds the served IP.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct

log = logging.getLogger(__name__)

_SIOCGIFADDR = 0x8915  # linux/sockios.h: get the IPv4 address of an interface


def serving_ip(fixed: str | None) -> str:
    """`fixed` when given (127.0.0.1 on an embedded Ray), else this node's IP."""
    if fixed:
        return fixed
    import ray

    return ray.util.get_node_ip_address()


def interface_of(ip: str) -> str | None:
    """The name of the network interface that holds IPv4 address `ip` (None if none does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                answer = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
            except OSError:  # no IPv4 address on this interface
                continue
            if socket.inet_ntoa(answer[20:24]) == ip:
                return name
    return None


def pin_interface(ip: str) -> str | None:
    """Make gloo and NCCL use the interface holding `ip` (unless the user chose one)."""
    name = interface_of(ip)
    if name is None:
        log.warning("no network interface holds %s; gloo/NCCL pick one from the hostname", ip)
        return None
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(var, name)
    return name


def free_port(host: str) -> int:
    """A TCP port free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
