#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <c10/util/Exception.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

namespace tcpstore_barrier {

class ReleaseWatcher;

// Which keys a barrier round uses on the store.
enum class Protocol {
  // torch.distributed.elastic.utils.store.barrier's keys, so that torch's
  // Python TCPStoreBarrier ranks can share the barrier with ours.
  kTorch,
  // TCPStore's server-side BARRIER request: one round trip per rank. Every
  // rank of the barrier must use it.
  kNative,
};

// Everything a barrier needs, in the units it uses. The torch-shaped
// constructor below fills one of these.
struct TCPStoreBarrierOptions {
  int64_t globalRank = 0;
  int64_t globalWorldSize = 1;
  std::string barrierPrefix;
  std::chrono::milliseconds initTimeout = std::chrono::seconds(60);
  bool useLibUV = true;
  int64_t port = 0;
  std::string masterAddress;
  std::chrono::milliseconds timeout = std::chrono::seconds(300);
  Protocol protocol = Protocol::kTorch;
};

// Raised when a barrier round does not complete in time. It names the ranks
// whose `rank{r}` key had not reached this round when the time ran out.
class BarrierTimeoutError : public c10::DistStoreError {
 public:
  BarrierTimeoutError(
      std::string barrierKey,
      int64_t sequence,
      std::chrono::milliseconds timeout,
      std::vector<int64_t> missingRanks,
      int64_t rank,
      int64_t worldSize);

  const std::string& barrierKey() const noexcept {
    return barrierKey_;
  }
  int64_t sequence() const noexcept {
    return sequence_;
  }
  std::chrono::milliseconds timeout() const noexcept {
    return timeout_;
  }
  const std::vector<int64_t>& missingRanks() const noexcept {
    return missingRanks_;
  }

 private:
  std::string barrierKey_;
  int64_t sequence_;
  std::chrono::milliseconds timeout_;
  std::vector<int64_t> missingRanks_;
};

// A reusable barrier over a c10d::TCPStore that speaks the key protocol of
// torch.distributed.checkpoint._experimental.barriers.TCPStoreBarrier.
//
// One object per rank; it is not meant to be shared between threads. A round
// that times out or is interrupted stays entered: the next call resumes
// waiting for the same round instead of entering it twice.
class TCPStoreBarrier {
 public:
  // torch's parameters, in torch's order.
  TCPStoreBarrier(
      int64_t global_rank,
      int64_t global_world_size,
      std::string barrier_prefix,
      int64_t timeout_barrier_init_secs,
      bool use_checkpoint_barrier_tcpstore_libuv,
      uint16_t tcpstore_port,
      std::string master_address,
      int64_t timeout_secs);

  // Creates (rank 0) or joins the store described by `options`. Every
  // argument is checked before a socket is opened.
  explicit TCPStoreBarrier(TCPStoreBarrierOptions options);

  // Joins barriers over a store the program already has (for instance the
  // default process group's). No server is started; nothing is closed.
  TCPStoreBarrier(
      c10::intrusive_ptr<c10d::Store> store,
      int64_t global_rank,
      int64_t global_world_size,
      std::string barrier_prefix,
      std::chrono::milliseconds timeout,
      Protocol protocol = Protocol::kTorch);

  ~TCPStoreBarrier();

  TCPStoreBarrier(const TCPStoreBarrier&) = delete;
  TCPStoreBarrier& operator=(const TCPStoreBarrier&) = delete;
  TCPStoreBarrier(TCPStoreBarrier&&) = delete;
  TCPStoreBarrier& operator=(TCPStoreBarrier&&) = delete;

  // Returns once every rank has entered the current round; throws
  // BarrierTimeoutError after `timeout` without that.
  void executeBarrier();

  // Enters the current round and returns once this rank's arrival has
  // reached the store, without waiting for the others. Calling it again
  // before wait() has completed the round does nothing. It is
  // startArrival() then finishArrival().
  void arrive();

  // Hands this rank's arrival at the current round to the barrier's own
  // thread and returns at once.
  void startArrival();
  // Waits up to `patience` for the arrival started by startArrival() to
  // reach the store; true once it has.
  bool awaitArrival(std::chrono::milliseconds patience);
  // Waits for it up to `timeout`, then throws c10::DistNetworkError.
  void finishArrival();

  // Completes the round entered by arrive(): returns once every rank has
  // entered it. The time limit counts from this call.
  void wait();

  // Whether the round entered by arrive() is already released, so that a
  // wait() would return without blocking.
  bool released() const;

  // The sequence number of the next round to complete.
  int64_t sequence() const noexcept {
    return sequence_;
  }

  bool usesLibUV() const noexcept {
    return usesLibUV_;
  }

  int64_t rank() const noexcept {
    return rank_;
  }
  int64_t worldSize() const noexcept {
    return worldSize_;
  }
  const std::string& barrierPrefix() const noexcept {
    return prefix_;
  }
  std::chrono::milliseconds timeout() const noexcept {
    return timeout_;
  }
  Protocol protocol() const noexcept {
    return protocol_;
  }
  const c10::intrusive_ptr<c10d::Store>& store() const noexcept {
    return store_;
  }

  // Called, without any lock held, between the slices of a blocking wait so
  // that an embedding runtime can act on signals; whatever it throws ends
  // the wait and leaves the round entered.
  void setInterruptCheck(std::function<void()> check);

  // Leaves the store. The shutdown rule: the rank that hosts the store
  // (rank 0) waits, up to `timeout`, until every rank of this library on
  // the store has called close(), so that no peer still finishing the last
  // round loses the store under it; other ranks only announce that they are
  // closing. torch's Python ranks never close and are not waited for. A
  // barrier over a store from elsewhere (from_store) leaves it as it is.
  // Destroying a barrier without close() tears its store down at once.
  // Idempotent.
  void close();
  bool closed() const noexcept {
    return !store_;
  }

 private:
  void enterRound();
  void waitInline(std::chrono::steady_clock::time_point deadline);
  void waitForRelease(std::chrono::steady_clock::time_point deadline);
  void completeRound(std::chrono::steady_clock::time_point deadline);
  void finishRound();
  void deleteFinishedRounds();
  void prepareRoundKeys();
  ReleaseWatcher& watcher();
  void startWatcher();
  void watchRelease(
      std::chrono::steady_clock::time_point deadline,
      std::function<bool(c10d::Store&)> arrival = nullptr);
  void announceArrival();
  std::vector<int64_t> missingRanks();
  std::vector<int64_t> ranksBehind();
  [[noreturn]] void rethrowStoreFailure(const std::exception& e) const;
  void checkOpen() const;
  // When a blocked caller next stops to check for interrupts.
  std::chrono::steady_clock::time_point nextInterruptCheck(
      std::chrono::steady_clock::time_point deadline) const;
  // A key of the barrier's own, outside every round's key space.
  std::string bookkeepingKey(std::string_view suffix) const;

  c10::intrusive_ptr<c10d::Store> store_;
  int64_t rank_;
  int64_t worldSize_;
  std::string prefix_;
  std::chrono::milliseconds timeout_;
  Protocol protocol_;
  bool usesLibUV_ = false;
  // Created by this object (not from_store): close() does the handshake.
  bool ownsStore_ = false;
  bool hostsStore_ = false;
  std::string storeAddress_;
  std::function<void()> interruptCheck_;
  // Waits for slow rounds and runs split-phase arrivals and store
  // housekeeping, on a thread and connection of its own.
  std::unique_ptr<ReleaseWatcher> watcher_;

  int64_t sequence_ = 0;
  bool arrived_ = false;
  bool released_ = false;

  // Keys of the current round, rebuilt once per round into reused buffers.
  std::string rankKey_;
  std::string sequenceText_;
  std::string numMembersKey_;
  // torch: `{prefix}{s}/last_member`; native: the server barrier's key.
  std::vector<std::string> releaseKey_;
  std::vector<uint8_t> sequenceValue_;
};

// Argument checks shared with the bindings, so that every entry point
// rejects the same values with the same messages (std::invalid_argument).
uint16_t checkedPort(int64_t port);
std::chrono::milliseconds checkedTimeout(double seconds, const char* name);

} // namespace tcpstore_barrier
