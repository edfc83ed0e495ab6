"""The lab fleet's links (issue 21): every host linked to Redis and to every other host,
each link a subnet of its own, interface names the kernel takes."""

from __future__ import annotations

import ipaddress
from itertools import combinations

import pytest

from diversityd_lab.netns import IFNAMSIZ
from diversityd_lab.topology import MAX_HOSTS, PREFIX_LEN, REDIS, plan_topology


@pytest.mark.parametrize("hosts", [1, 2, 3, 7])
def test_every_pair_has_a_link_of_its_own(hosts: int) -> None:
    topology = plan_topology(hosts)
    assert topology.nodes == (*topology.hosts, REDIS)
    wanted = {frozenset((h, REDIS)) for h in topology.hosts}
    wanted |= {frozenset(pair) for pair in combinations(topology.hosts, 2)}
    assert [link.nodes() for link in topology.links] == list(
        dict.fromkeys(link.nodes() for link in topology.links)
    )
    assert {link.nodes() for link in topology.links} == wanted
    networks = [
        ipaddress.ip_interface(f"{link.first.address}/{PREFIX_LEN}").network
        for link in topology.links
    ]
    assert len(set(networks)) == len(networks)
    for link, network in zip(topology.links, networks, strict=True):
        assert ipaddress.ip_address(link.second.address) in network


def test_interface_names_are_unique_per_namespace_and_short_enough() -> None:
    topology = plan_topology(MAX_HOSTS)
    for node in topology.nodes:
        names = [link.end(node).ifname for link in topology.links if node in link.nodes()]
        assert len(names) == len(set(names))
        assert all(len(name) <= IFNAMSIZ for name in names)


def test_a_node_is_reached_at_its_own_end_of_the_link() -> None:
    topology = plan_topology(2)
    link = topology.link("h0", "h1")
    assert topology.address("h0", seen_from="h1") == link.end("h0").address
    assert topology.address("h1", seen_from="h0") == link.end("h1").address
    assert topology.address(REDIS, seen_from="h0") != topology.address(REDIS, seen_from="h1")
    assert link.end("h0").ifname == "to-h1"
    with pytest.raises(KeyError):
        topology.link("h0", "h0")


@pytest.mark.parametrize("hosts", [0, MAX_HOSTS + 1])
def test_fleet_sizes_are_bounded(hosts: int) -> None:
    with pytest.raises(ValueError, match="hosts"):
        plan_topology(hosts)
