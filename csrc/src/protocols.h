// What each protocol (tcpstore_barrier::Protocol) knows: the keys of a round,
// how a rank arrives, who watches its peers, how missing ranks are named and
// which keys a finished round leaves. Nothing else branches on the protocol.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <tcpstore_barrier/tcpstore_barrier.h>

#include "store_connection.h"

namespace tcpstore_barrier {

struct Arrival {
  // This rank arrived last: the round is released and nothing is awaited.
  bool released = false;
  // This rank's place in the arrival order (1 = first), when known.
  int64_t order = 0;
};

// Who arrives in a round and what each arrival counts; the defaults are a
// flat barrier's: every rank 0..worldSize-1 takes part and counts one.
struct RoundShape {
  // What this rank's arrival adds to the count (at the root of a tree, a
  // top-level leader counts its whole subtree in one add).
  int64_t weight = 1;
  // The ranks that arrive at this store themselves (a tree's root: its
  // top-level leaders and torch's ranks); empty for all of 0..worldSize-1.
  std::vector<int64_t> members;

  // The ranks that arrive at this store, given its world size.
  std::vector<int64_t> memberRanks(int64_t worldSize) const;
};

// The keys of the round the caller is in, kept between rounds so that
// entering one allocates nothing once they have grown. Caller thread only.
struct RoundKeys {
  std::string sequenceText;
  // What the arrival writes: torch's `{prefix}{s}/num_members`, a relay
  // round's `{prefix}{s}/in/{r}`.
  std::string arrivalKey;
  // What releases the round: torch's `last_member`, native's `barrier`, a
  // relay round's `out`.
  std::string releaseKey;
};

// Which `rank{r}` keys exist. They are never deleted, so a key seen once
// stays seen. Each thread that names missing ranks keeps its own.
struct RankKeyCache {
  std::vector<std::string> keys;
  std::vector<bool> seen;
};

// A protocol is a const description of a round's keys and requests: it is
// shared by the caller thread and the worker, and holds nothing that
// changes; the buffers it fills belong to whoever passes them in.
class RoundProtocol {
 public:
  RoundProtocol(
      int64_t rank, int64_t worldSize, std::string prefix, RoundShape shape);
  virtual ~RoundProtocol() = default;

  // Sends this rank's arrival at round `sequence`, filling `round`.
  virtual void sendArrival(
      StoreConnection& connection,
      RoundKeys& round,
      int64_t sequence,
      Clock::time_point deadline) const = 0;
  // Whether the store's answer to the arrival is here (or none is due), so
  // that finishArrival() will not block.
  virtual bool arrivalAnswered(
      StoreConnection& connection, Clock::time_point until) const = 0;
  // Reads the store's answer and, unless the arrival released the round,
  // starts the wait for the release on `connection`.
  virtual Arrival finishArrival(
      StoreConnection& connection,
      const RoundKeys& round,
      Clock::time_point deadline) const = 0;

  // Called once a round has waited kSlowRound without releasing.
  virtual void noteSlowRound(
      StoreConnection& connection, const RoundKeys& round) const = 0;

  // Whether a rank that entered a round so watches its peers' liveness: a
  // few ranks per round do, so the store's load does not grow with them.
  bool watches(const Arrival& arrival) const;

  // The ranks that had not entered round `sequence`.
  virtual std::vector<int64_t> missingRanks(
      StoreConnection& connection,
      RankKeyCache& cache,
      int64_t sequence,
      Clock::time_point deadline) const = 0;

  const RoundShape& shape() const noexcept {
    return shape_;
  }

  // The key whose setting releases round `sequence`, for messages.
  virtual std::string releaseKey(int64_t sequence) const = 0;

  // Deletes the keys of rounds `newest`, `newest`-1, ... (at least `count`
  // of them, once every rank has left them): by default those `count`, in
  // one send.
  virtual void deleteRounds(
      StoreConnection& connection,
      int64_t newest,
      int64_t count,
      Clock::time_point deadline) const;
  // Deletes the keys of round `newest` and every round before it back to
  // the first found already deleted.
  void deleteAllRounds(
      StoreConnection& connection,
      int64_t newest,
      Clock::time_point deadline) const;

 protected:
  // The keys a round leaves in the store.
  virtual std::vector<std::string> roundKeys(int64_t sequence) const = 0;

  // Ranks whose `rank{r}` key is missing or below `sequence`.
  std::vector<int64_t> ranksBehind(
      StoreConnection& connection,
      RankKeyCache& cache,
      int64_t sequence,
      Clock::time_point deadline) const;
  // The same, read until it agrees with the number of ranks that
  // `countKey` says have arrived (for at most 300 ms).
  std::vector<int64_t> ranksBehindCount(
      StoreConnection& connection,
      RankKeyCache& cache,
      int64_t sequence,
      const std::string& countKey,
      Clock::time_point deadline) const;
  std::string roundKey(int64_t sequence, std::string_view suffix) const;
  // `{prefix}{s}{suffix}` into `key`, reusing its storage.
  void assignRoundKey(
      std::string& key, const RoundKeys& round, std::string_view suffix) const;
  void writeRankKey(StoreConnection& connection, const RoundKeys& round) const;

  const int64_t rank_;
  const int64_t worldSize_;
  const std::string prefix_;
  const std::string rankKey_;
  const RoundShape shape_;
  const std::vector<int64_t> members_;
};

std::unique_ptr<RoundProtocol> makeRoundProtocol(
    Protocol protocol,
    int64_t rank,
    int64_t worldSize,
    const std::string& prefix,
    RoundShape shape = {});

// A round at a store below a tree's root (RelayProtocol in protocols.cpp):
// each member arrives by setting `{prefix}{s}/in/{m}` (`m`: its rank at the
// store) and waits for `{prefix}{s}/out`, which the store's leader's worker
// sets once it has seen every member's `in` and the tree has released the
// round (the protocol's releaseKey()).
std::unique_ptr<RoundProtocol> makeRelayProtocol(
    int64_t rank,
    int64_t worldSize,
    const std::string& prefix,
    RoundShape shape);
// Member `member`'s `in` key of round `sequence` into `key`, reusing its
// storage.
void assignRelayArrivalKey(
    std::string& key,
    const std::string& prefix,
    int64_t sequence,
    int64_t member);
// Every member's `in` key of round `sequence`, member m's into `keys[m]`
// (a relay store's members are its ranks 0...keys.size()-1).
void assignRelayArrivalKeys(
    std::vector<std::string>& keys,
    const std::string& prefix,
    int64_t sequence);

// Decimal text of `value`, and its parse (nullopt unless all digits).
void appendDecimal(std::string& out, int64_t value);
std::optional<int64_t> parseDecimal(std::string_view text);

} // namespace tcpstore_barrier
