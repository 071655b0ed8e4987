#include "protocols.h"

#include <algorithm>
#include <charconv>
#include <thread>
#include <utility>

namespace tcpstore_barrier {
namespace {

// Key names of torch.distributed.elastic.utils.store.barrier: a round is
// released by its last member setting `last_member`.
constexpr std::string_view kNumMembersSuffix = "/num_members";
constexpr std::string_view kLastMemberSuffix = "/last_member";
constexpr std::string_view kReleasedValue = "<val_ignored>";
constexpr std::string_view kServerBarrierSuffix = "/barrier";
// A relay round's keys (RelayProtocol).
constexpr std::string_view kRelayInInfix = "/in/";
constexpr std::string_view kRelayArrivedValue = "1";
constexpr std::string_view kRelayOutSuffix = "/out";

class TorchKeysProtocol final : public RoundProtocol {
 public:
  using RoundProtocol::RoundProtocol;

  void sendArrival(
      StoreConnection& connection,
      RoundKeys& round,
      int64_t sequence,
      Clock::time_point deadline) const override {
    // torch's class announces the round it joins under `rank{r}` first; the
    // value is what names a missing rank when a round times out. It leaves
    // in the same send as the add.
    round.sequenceText.clear();
    appendDecimal(round.sequenceText, sequence);
    writeRankKey(connection, round);
    assignRoundKey(round.arrivalKey, round, kNumMembersSuffix);
    assignRoundKey(round.releaseKey, round, kLastMemberSuffix);
    connection.sendAdd(round.arrivalKey, shape_.weight, deadline);
  }

  bool arrivalAnswered(
      StoreConnection& connection, Clock::time_point until) const override {
    return connection.replyReady(until);
  }

  Arrival finishArrival(
      StoreConnection& connection,
      const RoundKeys& round,
      Clock::time_point deadline) const override {
    const int64_t order = connection.readAdd(deadline);
    if (order >= worldSize_) {
      // The last arriver releases the others and has nothing to wait for.
      connection.set(round.releaseKey, kReleasedValue);
      connection.flush(deadline);
      return {true, order};
    }
    connection.startWait(round.releaseKey, deadline);
    return {false, order};
  }

  void noteSlowRound(StoreConnection&, const RoundKeys&) const override {}

  std::vector<int64_t> missingRanks(
      StoreConnection& connection,
      RankKeyCache& cache,
      int64_t sequence,
      Clock::time_point deadline) const override {
    return ranksBehind(connection, cache, sequence, deadline);
  }

  std::string releaseKey(int64_t sequence) const override {
    return roundKey(sequence, kLastMemberSuffix);
  }

  std::vector<std::string> roundKeys(int64_t sequence) const override {
    return {
        roundKey(sequence, kNumMembersSuffix),
        roundKey(sequence, kLastMemberSuffix)};
  }

  void deleteRounds(
      StoreConnection& connection,
      int64_t newest,
      int64_t /*count*/,
      Clock::time_point deadline) const override {
    // A torch rank never takes its turn, so walk back past this batch while
    // older rounds are still there. Walkers that meet stop at each other's
    // deletes; the one still deleting carries on down, so no round is
    // skipped.
    deleteAllRounds(connection, newest, deadline);
  }
};

class ServerBarrierProtocol final : public RoundProtocol {
 public:
  using RoundProtocol::RoundProtocol;

  void sendArrival(
      StoreConnection& connection,
      RoundKeys& round,
      int64_t sequence,
      Clock::time_point deadline) const override {
    round.sequenceText.clear();
    appendDecimal(round.sequenceText, sequence);
    assignRoundKey(round.releaseKey, round, kServerBarrierSuffix);
    // The request is the arrival: the server answers it once the count is
    // reached. The `rank{r}` key waits for noteSlowRound(), which halves the
    // server's work in rounds that release at once.
    connection.startServerBarrier(round.releaseKey, worldSize_, deadline);
  }

  bool arrivalAnswered(StoreConnection&, Clock::time_point) const override {
    return true;
  }

  Arrival finishArrival(
      StoreConnection&, const RoundKeys&, Clock::time_point) const override {
    return {false, 0};
  }

  std::vector<int64_t> missingRanks(
      StoreConnection& connection,
      RankKeyCache& cache,
      int64_t sequence,
      Clock::time_point deadline) const override {
    return ranksBehindCount(
        connection, cache, sequence, releaseKey(sequence), deadline);
  }

  void noteSlowRound(
      StoreConnection& connection, const RoundKeys& round) const override {
    writeRankKey(connection, round);
  }

  std::string releaseKey(int64_t sequence) const override {
    return roundKey(sequence, kServerBarrierSuffix);
  }

  std::vector<std::string> roundKeys(int64_t sequence) const override {
    return {roundKey(sequence, kServerBarrierSuffix)};
  }
};

// A store below a tree's root. A member's arrival is its own key, `in/{m}`,
// set in the same send as its wait for `out`: the store answers it once,
// with the release, so the member wakes once a round. The store's leader's
// worker waits for all the members' `in` keys (its own among them, where it
// is a member for the store it leads below), climbs the tree, and sets
// `out` once the root has released, as MPICH broadcasts a release down its
// tree. A release is a key set, so a member that stopped calling holds
// nobody back, and the `in` keys say exactly who has arrived.
class RelayProtocol final : public RoundProtocol {
 public:
  using RoundProtocol::RoundProtocol;

  void sendArrival(
      StoreConnection& connection,
      RoundKeys& round,
      int64_t sequence,
      Clock::time_point deadline) const override {
    round.sequenceText.clear();
    appendDecimal(round.sequenceText, sequence);
    assignRelayArrivalKey(round.arrivalKey, prefix_, sequence, rank_);
    assignRoundKey(round.releaseKey, round, kRelayOutSuffix);
    connection.set(round.arrivalKey, kRelayArrivedValue);
    connection.startWait(round.releaseKey, deadline);
  }

  bool arrivalAnswered(StoreConnection&, Clock::time_point) const override {
    return true;
  }

  Arrival finishArrival(
      StoreConnection&, const RoundKeys&, Clock::time_point) const override {
    return {false, 0};
  }

  // The arrival is its own note.
  void noteSlowRound(StoreConnection&, const RoundKeys&) const override {}

  std::vector<int64_t> missingRanks(
      StoreConnection& connection,
      RankKeyCache&,
      int64_t sequence,
      Clock::time_point deadline) const override {
    std::vector<std::string> keys(members_.size());
    assignRelayArrivalKeys(keys, prefix_, sequence);
    const auto arrived = connection.checkEach(keys, deadline);
    std::vector<int64_t> missing;
    for (std::size_t m = 0; m < arrived.size(); ++m) {
      if (!arrived[m]) {
        missing.push_back(static_cast<int64_t>(m));
      }
    }
    return missing;
  }

  std::string releaseKey(int64_t sequence) const override {
    return roundKey(sequence, kRelayOutSuffix);
  }

  // `out` first: deleteAllRounds() takes a round whose first key is gone
  // for deleted, and every released round has its `out`.
  std::vector<std::string> roundKeys(int64_t sequence) const override {
    std::vector<std::string> keys(members_.size());
    assignRelayArrivalKeys(keys, prefix_, sequence);
    keys.insert(keys.begin(), roundKey(sequence, kRelayOutSuffix));
    return keys;
  }
};

} // namespace

void appendDecimal(std::string& out, int64_t value) {
  char digits[24];
  const auto result = std::to_chars(digits, digits + sizeof(digits), value);
  out.append(digits, result.ptr);
}

std::optional<int64_t> parseDecimal(std::string_view text) {
  int64_t value = 0;
  const auto result =
      std::from_chars(text.data(), text.data() + text.size(), value);
  if (result.ec != std::errc() || result.ptr != text.data() + text.size()) {
    return std::nullopt;
  }
  return value;
}

namespace {

std::string rankKeyOf(int64_t rank) {
  std::string key = "rank";
  appendDecimal(key, rank);
  return key;
}

} // namespace

std::vector<int64_t> RoundShape::memberRanks(int64_t worldSize) const {
  if (!members.empty()) {
    return members;
  }
  std::vector<int64_t> all;
  for (int64_t r = 0; r < worldSize; ++r) {
    all.push_back(r);
  }
  return all;
}

RoundProtocol::RoundProtocol(
    int64_t rank, int64_t worldSize, std::string prefix, RoundShape shape)
    : rank_(rank),
      worldSize_(worldSize),
      prefix_(std::move(prefix)),
      rankKey_(rankKeyOf(rank)),
      shape_(std::move(shape)),
      members_(shape_.memberRanks(worldSize)) {}

void RoundProtocol::deleteAllRounds(
    StoreConnection& connection,
    int64_t newest,
    Clock::time_point deadline) const {
  // Batches of rounds, newest first, down to the first round already gone
  // (round `newest` may never have been entered): which rounds are there
  // is asked first, so that no key is deleted twice.
  constexpr int64_t kWalk = 64;
  for (int64_t last = newest; last >= 0; last -= kWalk) {
    std::vector<std::string> firsts;
    for (int64_t old = last; old > last - kWalk && old >= 0; --old) {
      firsts.push_back(roundKeys(old).front());
    }
    const auto present = connection.checkEach(firsts, deadline);
    std::vector<std::string> keys;
    bool older = true;
    for (std::size_t i = 0; i < present.size(); ++i) {
      if (!present[i]) {
        if (last == newest && i == 0) {
          continue;
        }
        older = false;
        break;
      }
      for (auto& key : roundKeys(last - static_cast<int64_t>(i))) {
        keys.push_back(std::move(key));
      }
    }
    if (!keys.empty()) {
      connection.deleteEach(keys, deadline);
    }
    if (!older) {
      return;
    }
  }
}

void RoundProtocol::deleteRounds(
    StoreConnection& connection,
    int64_t newest,
    int64_t count,
    Clock::time_point deadline) const {
  std::vector<std::string> keys;
  for (int64_t old = newest; old > newest - count && old >= 0; --old) {
    for (auto& key : roundKeys(old)) {
      keys.push_back(std::move(key));
    }
  }
  connection.deleteEach(keys, deadline);
}

bool RoundProtocol::watches(const Arrival& arrival) const {
  // The first two arrivers wait the longest; the first two members stand
  // in when the order is unknown (native, or weighted arrivals at a tree's
  // root) or those arrivers are torch's ranks.
  const bool standIn = rank_ == members_.front() ||
                       (members_.size() > 1 && rank_ == members_[1]);
  return standIn ||
         (shape_.weight == 1 && arrival.order >= 1 && arrival.order <= 2);
}

std::string RoundProtocol::roundKey(
    int64_t sequence, std::string_view suffix) const {
  std::string key = prefix_;
  appendDecimal(key, sequence);
  key.append(suffix);
  return key;
}

void RoundProtocol::assignRoundKey(
    std::string& key, const RoundKeys& round, std::string_view suffix) const {
  key.assign(prefix_).append(round.sequenceText).append(suffix);
}

void RoundProtocol::writeRankKey(
    StoreConnection& connection, const RoundKeys& round) const {
  connection.set(rankKey_, round.sequenceText);
}

std::vector<int64_t> RoundProtocol::ranksBehindCount(
    StoreConnection& connection,
    RankKeyCache& cache,
    int64_t sequence,
    const std::string& countKey,
    Clock::time_point deadline) const {
  // A native rank writes its `rank{r}` key only once its round has been
  // slow, so one that arrived just now may not have written it yet: the
  // round's count says how many arrived, and the keys catch up within
  // moments.
  const std::vector<std::string> count{countKey};
  const auto arrived = [&] {
    if (!connection.check(count, deadline)) {
      return int64_t{0};
    }
    return parseDecimal(connection.multiGet(count, deadline).front())
        .value_or(0);
  };
  const auto memberCount = static_cast<int64_t>(members_.size());
  // Everyone counted: no key need catch up (nor will a rank released at
  // once ever write its key, however slow the round is elsewhere).
  auto counted = arrived();
  if (counted >= memberCount) {
    return {};
  }
  auto missing = ranksBehind(connection, cache, sequence, deadline);
  const auto giveUp =
      std::min(deadline, Clock::now() + std::chrono::milliseconds(300));
  while (memberCount - static_cast<int64_t>(missing.size()) < counted &&
         Clock::now() < giveUp) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    missing = ranksBehind(connection, cache, sequence, deadline);
    counted = arrived();
  }
  return missing;
}

std::vector<int64_t> RoundProtocol::ranksBehind(
    StoreConnection& connection,
    RankKeyCache& cache,
    int64_t sequence,
    Clock::time_point deadline) const {
  if (cache.keys.empty()) {
    for (const int64_t r : members_) {
      cache.keys.push_back(rankKeyOf(r));
    }
    cache.seen.assign(cache.keys.size(), false);
  }
  // Before every rank has entered some round, a rank without a key is
  // missing; reading a missing key is an error on the legacy server.
  std::vector<std::string> unseen;
  std::vector<std::size_t> unseenRanks;
  for (std::size_t i = 0; i < cache.keys.size(); ++i) {
    if (!cache.seen[i]) {
      unseen.push_back(cache.keys[i]);
      unseenRanks.push_back(i);
    }
  }
  if (!unseen.empty()) {
    const auto exists = connection.checkEach(unseen, deadline);
    for (std::size_t i = 0; i < exists.size(); ++i) {
      cache.seen[unseenRanks[i]] = exists[i];
    }
  }
  std::vector<std::string> keys;
  std::vector<int64_t> keyRanks;
  std::vector<int64_t> missing;
  for (std::size_t i = 0; i < cache.keys.size(); ++i) {
    if (cache.seen[i]) {
      keys.push_back(cache.keys[i]);
      keyRanks.push_back(members_[i]);
    } else {
      missing.push_back(members_[i]);
    }
  }
  const auto values = keys.empty() ? std::vector<std::string>{}
                                   : connection.multiGet(keys, deadline);
  for (std::size_t i = 0; i < values.size(); ++i) {
    const auto round = parseDecimal(values[i]);
    if (!round || *round < sequence) {
      missing.push_back(keyRanks[i]);
    }
  }
  std::sort(missing.begin(), missing.end());
  return missing;
}

std::unique_ptr<RoundProtocol> makeRelayProtocol(
    int64_t rank,
    int64_t worldSize,
    const std::string& prefix,
    RoundShape shape) {
  return std::make_unique<RelayProtocol>(
      rank, worldSize, prefix, std::move(shape));
}

void assignRelayArrivalKey(
    std::string& key,
    const std::string& prefix,
    int64_t sequence,
    int64_t member) {
  key.assign(prefix);
  appendDecimal(key, sequence);
  key.append(kRelayInInfix);
  appendDecimal(key, member);
}

void assignRelayArrivalKeys(
    std::vector<std::string>& keys,
    const std::string& prefix,
    int64_t sequence) {
  for (std::size_t m = 0; m < keys.size(); ++m) {
    assignRelayArrivalKey(keys[m], prefix, sequence, static_cast<int64_t>(m));
  }
}

std::unique_ptr<RoundProtocol> makeRoundProtocol(
    Protocol protocol,
    int64_t rank,
    int64_t worldSize,
    const std::string& prefix,
    RoundShape shape) {
  if (protocol == Protocol::kNative) {
    return std::make_unique<ServerBarrierProtocol>(
        rank, worldSize, prefix, std::move(shape));
  }
  return std::make_unique<TorchKeysProtocol>(
      rank, worldSize, prefix, std::move(shape));
}

} // namespace tcpstore_barrier
