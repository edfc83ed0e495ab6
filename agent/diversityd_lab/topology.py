"""Who is linked to whom in the lab's fleet, and at which addresses (pure: no I/O).

N hosts (`h0`, `h1`, ...) and a Redis (`redis`), each a network namespace. Every host has
one link to the Redis and one to every other host, each link a /30 of its own, so cutting
one link (taking its interfaces down) leaves every other path as it was: Redis cut off from
h0 is still reached from h1, and h0 still reaches h1. In each namespace the interface
toward node X is named `to-X`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from itertools import combinations

REDIS = "redis"
NETWORK = "10.201.0.0/16"
PREFIX_LEN = 30
MAX_HOSTS = 100  # keeps `to-h99` short and every link inside NETWORK


def host_name(index: int) -> str:
    return f"h{index}"


@dataclass(frozen=True)
class LinkEnd:
    node: str
    ifname: str  # the interface in `node`'s namespace
    address: str  # its IPv4 address (prefix length PREFIX_LEN)


@dataclass(frozen=True)
class Link:
    first: LinkEnd
    second: LinkEnd

    def nodes(self) -> frozenset[str]:
        return frozenset((self.first.node, self.second.node))

    def end(self, node: str) -> LinkEnd:
        if node == self.first.node:
            return self.first
        if node == self.second.node:
            return self.second
        raise KeyError(f"{node} is not on the link {self.first.node}-{self.second.node}")


@dataclass(frozen=True)
class Topology:
    hosts: tuple[str, ...]
    links: tuple[Link, ...]

    @property
    def nodes(self) -> tuple[str, ...]:
        return (*self.hosts, REDIS)

    def link(self, a: str, b: str) -> Link:
        for link in self.links:
            if link.nodes() == {a, b}:
                return link
        raise KeyError(f"no link between {a} and {b}")

    def address(self, node: str, *, seen_from: str) -> str:
        """The address `seen_from` dials to reach `node`: `node`'s end of their link."""
        return self.link(node, seen_from).end(node).address


def plan_topology(hosts: int, network: str = NETWORK) -> Topology:
    if not 1 <= hosts <= MAX_HOSTS:
        raise ValueError(f"a fleet has 1 to {MAX_HOSTS} hosts, not {hosts}")
    names = tuple(host_name(index) for index in range(hosts))
    pairs = [(name, REDIS) for name in names] + list(combinations(names, 2))
    subnets = ipaddress.IPv4Network(network).subnets(new_prefix=PREFIX_LEN)
    links = []
    for (a, b), subnet in zip(pairs, subnets, strict=False):
        address_a, address_b = list(subnet.hosts())
        links.append(
            Link(LinkEnd(a, f"to-{b}", str(address_a)), LinkEnd(b, f"to-{a}", str(address_b)))
        )
    return Topology(names, tuple(links))
