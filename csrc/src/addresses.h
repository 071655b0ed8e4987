// Which addresses a tree's stores listen on and are published at, and
// which ranks count as one host.
#pragma once

#include <string>
#include <vector>

namespace tcpstore_barrier {

// In a published list of a store's addresses: "the address you reach rank
// 0's store at". Published by a leader that reaches rank 0's store over
// loopback, so shares its host: the other hosts already reach that host.
inline constexpr const char* kRootHostAlias = "*";

struct LeaderAddresses {
  // What the leader's store listens on: `local` itself, or the wildcard of
  // its family when `local` is loopback.
  std::string bind;
  // Where members try to reach it, in order.
  std::vector<std::string> published;
};

// `local`: the address this rank's connection to rank 0's store comes
// from. Not loopback: that address only (the host's address on the job's
// network), as before. Loopback (this rank shares rank 0's host and reached
// it over loopback, as with a master name that is 127.0.1.1 here): the
// wildcard, published as where the others reach rank 0's store, then this
// host's addresses other than loopback (IPv6 ones only for an IPv6
// wildcard, which takes IPv4 too), never loopback itself.
LeaderAddresses leaderAddresses(const std::string& local);

bool isLoopbackAddress(const std::string& numeric);

// This rank's host, for grouping ranks into host stores: the host's name,
// the address it reaches rank 0's store from, and its kernel's boot id and
// network namespace, so that processes that cannot reach each other's
// loopback (containers with the same name behind NAT) are never one host.
std::string defaultHostIdentity(const std::string& localAddress);

} // namespace tcpstore_barrier
