// What each protocol (tcpstore_barrier::Protocol) knows: the keys of a round,
// how a rank arrives, who watches its peers, how missing ranks are named and
// which keys a finished round leaves. Nothing else branches on the protocol.
#pragma once

#include <cstdint>
#include <memory>
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

// The keys of the round the caller is in, kept between rounds so that
// entering one allocates nothing once they have grown. Caller thread only.
struct RoundKeys {
  std::string sequenceText;
  // torch: `{prefix}{s}/num_members`.
  std::string countKey;
  // What releases the round: torch's `last_member`, native's `barrier`.
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
  RoundProtocol(int64_t rank, int64_t worldSize, std::string prefix);
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

  // The key whose setting releases round `sequence`, for messages.
  virtual std::string releaseKey(int64_t sequence) const = 0;

  // Deletes the keys of rounds `newest`, `newest`-1, ... (at least `count`
  // of them, once every rank has left them).
  virtual void deleteRounds(
      StoreConnection& connection,
      int64_t newest,
      int64_t count,
      Clock::time_point deadline) const = 0;

 protected:
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
};

std::unique_ptr<RoundProtocol> makeRoundProtocol(
    Protocol protocol,
    int64_t rank,
    int64_t worldSize,
    const std::string& prefix);

// Decimal text of `value`, and its parse (nullopt unless all digits).
void appendDecimal(std::string& out, int64_t value);
std::optional<int64_t> parseDecimal(std::string_view text);

} // namespace tcpstore_barrier
