// The shape of a tree of stores, computed once by rank 0 from the host of
// every rank and published on the root store for each rank to read its part.
//
// Ranks on one host meet at a store hosted by the host's lowest rank (its
// leader; a host of more than 64 ranks has a store per 64); leaders meet in
// groups of at most `fanIn` at a store hosted by the group's first leader, and
// so on until at most `fanIn` remain: they meet at the root, rank 0's store. A
// host or group of one has no store.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace tcpstore_barrier {

struct TreeStore {
  // 0 is the root.
  int64_t id = 0;
  // Global ranks in local-rank order; members[0] hosts the store (not at
  // the root, which rank 0 hosts whoever its members are).
  std::vector<int64_t> members;
  // The global ranks each member stands for: its subtree, itself included.
  std::vector<std::vector<int64_t>> subtrees;
  // The store each member hosts one level down, or -1 (a rank alone on its
  // host, or a host's other ranks).
  std::vector<int64_t> children;
  // The ranks the store's host stands for at the topmost store it meets at
  // (empty at the root): all lost to the barrier when that host is.
  std::vector<int64_t> hostSubtree;

  // The global ranks below this store.
  int64_t size() const;
};

struct TreePlan {
  // Indexed by id; stores[0] is the root.
  std::vector<TreeStore> stores;
  // Each rank's stores, bottom up.
  std::map<int64_t, std::vector<int64_t>> storesOf;
};

// `rankHosts`: (rank, host) for every rank of this library; ranks absent
// from it (torch's) join at the root by themselves.
TreePlan planTree(
    const std::vector<std::pair<int64_t, std::string>>& rankHosts,
    int64_t fanIn);

// "a-b,c": sorted ranks as ranges, and back.
std::string encodeRanks(const std::vector<int64_t>& ranks);
std::vector<int64_t> decodeRanks(std::string_view text);

// A store as the root keeps it, and back: "host-subtree-ranges;" then
// "rank:child:ranges|..." a member.
std::string encodeStore(const TreeStore& store);
TreeStore decodeStore(int64_t id, std::string_view text);

} // namespace tcpstore_barrier
