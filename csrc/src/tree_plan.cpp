#include "tree_plan.h"

#include <algorithm>
#include <stdexcept>

#include "protocols.h"

namespace tcpstore_barrier {
namespace {

// A subtree on its way up: the rank that speaks for it at the next level,
// the store it hosts there (-1 if none) and the ranks it stands for.
struct Node {
  int64_t leader;
  int64_t child;
  std::vector<int64_t> ranks;
};

// A host's ranks share stores of at most this many members (or the fan-in,
// if larger): a machine running hundreds of ranks, or a test running a
// whole world on one machine, must not make one store serve them all.
constexpr std::size_t kMaxHostStore = 64;

// Gives `nodes` a store (unless alone) and returns the node they become.
Node gather(TreePlan& plan, std::vector<Node> nodes) {
  if (nodes.size() == 1) {
    return std::move(nodes.front());
  }
  TreeStore store;
  store.id = static_cast<int64_t>(plan.stores.size());
  Node parent{nodes.front().leader, store.id, {}};
  for (auto& node : nodes) {
    store.members.push_back(node.leader);
    store.children.push_back(node.child);
    parent.ranks.insert(
        parent.ranks.end(), node.ranks.begin(), node.ranks.end());
    plan.storesOf[node.leader].push_back(store.id);
    store.subtrees.push_back(std::move(node.ranks));
  }
  std::sort(parent.ranks.begin(), parent.ranks.end());
  plan.stores.push_back(std::move(store));
  return parent;
}

} // namespace

int64_t TreeStore::size() const {
  int64_t total = 0;
  for (const auto& subtree : subtrees) {
    total += static_cast<int64_t>(subtree.size());
  }
  return total;
}

TreePlan planTree(
    const std::vector<std::pair<int64_t, std::string>>& rankHosts,
    int64_t fanIn) {
  if (fanIn < 2) {
    throw std::invalid_argument("a tree's fan-in must be at least 2");
  }
  TreePlan plan;
  plan.stores.emplace_back();
  // Hosts in the order of their lowest rank, each host's ranks in order.
  std::map<std::string, std::vector<int64_t>> byHost;
  for (const auto& [rank, host] : rankHosts) {
    byHost[host].push_back(rank);
  }
  std::vector<std::vector<int64_t>> hosts;
  for (auto& [host, ranks] : byHost) {
    std::sort(ranks.begin(), ranks.end());
    hosts.push_back(std::move(ranks));
  }
  std::sort(hosts.begin(), hosts.end(), [](const auto& a, const auto& b) {
    return a.front() < b.front();
  });
  const auto hostStore =
      std::max(kMaxHostStore, static_cast<std::size_t>(fanIn));
  std::vector<Node> level;
  for (const auto& ranks : hosts) {
    for (std::size_t first = 0; first < ranks.size(); first += hostStore) {
      std::vector<Node> alone;
      for (std::size_t i = first; i < std::min(ranks.size(), first + hostStore);
           ++i) {
        alone.push_back(Node{ranks[i], -1, {ranks[i]}});
      }
      level.push_back(gather(plan, std::move(alone)));
    }
  }
  while (static_cast<int64_t>(level.size()) > fanIn) {
    std::vector<Node> next;
    for (std::size_t first = 0; first < level.size();
         first += static_cast<std::size_t>(fanIn)) {
      const auto last =
          std::min(level.size(), first + static_cast<std::size_t>(fanIn));
      next.push_back(gather(
          plan,
          std::vector<Node>(
              std::make_move_iterator(level.begin() + first),
              std::make_move_iterator(level.begin() + last))));
    }
    level = std::move(next);
  }
  auto& root = plan.stores.front();
  for (auto& node : level) {
    root.members.push_back(node.leader);
    root.children.push_back(node.child);
    plan.storesOf[node.leader].push_back(0);
    root.subtrees.push_back(std::move(node.ranks));
  }
  for (auto& store : plan.stores) {
    if (store.id == 0) {
      continue;
    }
    const int64_t host = store.members.front();
    const auto& top =
        plan.stores[static_cast<std::size_t>(plan.storesOf.at(host).back())];
    const auto at = std::find(top.members.begin(), top.members.end(), host);
    store.hostSubtree =
        top.subtrees[static_cast<std::size_t>(at - top.members.begin())];
  }
  return plan;
}

std::string encodeRanks(const std::vector<int64_t>& ranks) {
  std::string text;
  for (std::size_t i = 0; i < ranks.size();) {
    std::size_t j = i;
    while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) {
      ++j;
    }
    if (!text.empty()) {
      text.push_back(',');
    }
    appendDecimal(text, ranks[i]);
    if (j > i) {
      text.push_back('-');
      appendDecimal(text, ranks[j]);
    }
    i = j + 1;
  }
  return text;
}

std::vector<int64_t> decodeRanks(std::string_view text) {
  std::vector<int64_t> ranks;
  while (!text.empty()) {
    const auto comma = text.find(',');
    const auto range = text.substr(0, comma);
    const auto dash = range.find('-');
    const auto first = parseDecimal(range.substr(0, dash));
    const auto last = dash == std::string_view::npos
                          ? first
                          : parseDecimal(range.substr(dash + 1));
    if (!first || !last) {
      throw std::runtime_error("malformed rank list in a tree's plan");
    }
    for (int64_t rank = *first; rank <= *last; ++rank) {
      ranks.push_back(rank);
    }
    text = comma == std::string_view::npos ? "" : text.substr(comma + 1);
  }
  return ranks;
}

std::string encodeStore(const TreeStore& store) {
  std::string text = encodeRanks(store.hostSubtree);
  text.push_back(';');
  for (std::size_t i = 0; i < store.members.size(); ++i) {
    if (i > 0) {
      text.push_back('|');
    }
    appendDecimal(text, store.members[i]);
    text.push_back(':');
    appendDecimal(text, store.children[i]);
    text.push_back(':');
    text.append(encodeRanks(store.subtrees[i]));
  }
  return text;
}

TreeStore decodeStore(int64_t id, std::string_view text) {
  TreeStore store;
  store.id = id;
  const auto semicolon = text.find(';');
  if (semicolon == std::string_view::npos) {
    throw std::runtime_error("malformed store in a tree's plan");
  }
  store.hostSubtree = decodeRanks(text.substr(0, semicolon));
  text = text.substr(semicolon + 1);
  while (!text.empty()) {
    const auto bar = text.find('|');
    const auto entry = text.substr(0, bar);
    const auto first = entry.find(':');
    const auto second = entry.find(':', first + 1);
    const auto member = parseDecimal(entry.substr(0, first));
    const auto child =
        parseDecimal(entry.substr(first + 1, second - first - 1));
    if (!member || !child || second == std::string_view::npos) {
      throw std::runtime_error("malformed store in a tree's plan");
    }
    store.members.push_back(*member);
    store.children.push_back(*child);
    store.subtrees.push_back(decodeRanks(entry.substr(second + 1)));
    text = bar == std::string_view::npos ? "" : text.substr(bar + 1);
  }
  return store;
}

} // namespace tcpstore_barrier
