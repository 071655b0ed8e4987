#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <c10/util/Exception.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

namespace tcpstore_barrier {

// Which keys a barrier round uses on the store.
enum class Protocol {
  // torch.distributed.elastic.utils.store.barrier's keys, so that torch's
  // Python TCPStoreBarrier ranks can share the barrier with ours.
  kTorch,
  // TCPStore's server-side BARRIER request: one round trip per rank. Every
  // rank of the barrier must use it, and the store must be a TCPStore.
  kNative,
};

// How the ranks of a barrier reach each other.
enum class Topology {
  // Flat below kTreeFromWorldSize ranks, a tree from there on.
  kAuto,
  // Every rank counts itself in at rank 0's store.
  kFlat,
  // Ranks meet at a store on their host, hosts' leaders in groups of at most
  // fanIn at a store one of them hosts, and so on up to rank 0's store: no
  // store serves more than fanIn ranks (or a host's ranks) per round.
  kTree,
};

// The world size from which Topology::kAuto builds a tree: from 600 ranks
// the one store's liveness can no longer keep the peer timeout, and below
// 1,024 the one store answered a round faster on the bench machine (see
// docs/performance.md, "Crossover at 1,024 ranks").
constexpr int64_t kTreeFromWorldSize = 1024;
// An environment variable that, set to a number of ranks, replaces
// kTreeFromWorldSize: for tests of "auto" without 1,024 ranks.
constexpr const char* kTreeFromWorldSizeVariable =
    "TCPSTORE_BARRIER_TREE_FROM_WORLD_SIZE";
// A tree store's members: a store's cost per round grows with it, each
// level adds a round trip; 8 was fastest measured at 1,024 ranks and in the
// model at 10,000 and 100,000 (docs/performance.md, "The model").
constexpr int64_t kDefaultTreeFanIn = 8;

struct TreeOptions {
  Topology topology = Topology::kAuto;
  // Which ranks share a host (and so a host store); by default the host's
  // name and the address it uses to reach rank 0's store.
  std::optional<std::string> host;
  int64_t fanIn = kDefaultTreeFanIn;
};

// The default of TCPStoreBarrierOptions::peerTimeout: torch elastic's
// rendezvous declares a silent node dead after 5 s too.
constexpr std::chrono::milliseconds kDefaultPeerTimeout{5000};

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
  // How long a peer of this library, or the store host, may stay silent
  // before a waiting rank gives up on it; nullopt turns liveness off.
  std::optional<std::chrono::milliseconds> peerTimeout = kDefaultPeerTimeout;
  TreeOptions tree = {};
};

// Raised when a barrier round does not complete in time. It names the ranks
// whose `rank{r}` key had not reached this round when the time ran out.
class BarrierTimeoutError : public c10::DistStoreError {
 public:
  BarrierTimeoutError(
      std::string message,
      std::string barrierKey,
      int64_t sequence,
      std::chrono::milliseconds timeout,
      std::vector<int64_t> missingRanks);

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

// Raised in a waiting rank when peers of this library stopped showing that
// they are alive for the peer timeout: the round can never complete. Every
// surviving rank names the same lost ranks. timeout() is the peer timeout.
class PeerLostError : public BarrierTimeoutError {
 public:
  PeerLostError(
      std::string message,
      std::string barrierKey,
      int64_t sequence,
      std::chrono::milliseconds peerTimeout,
      std::vector<int64_t> missingRanks,
      std::vector<int64_t> lostRanks);

  const std::vector<int64_t>& lostRanks() const noexcept {
    return lostRanks_;
  }

 private:
  std::vector<int64_t> lostRanks_;
};

// Raised when the store host is gone (its connections closed or reset) or
// stopped answering (frozen, or cut off with its connections left open).
// After it, every call of the barrier raises it again. A DistNetworkError,
// not a BarrierTimeoutError: no round timed out. The same in Python.
class StoreUnreachableError : public c10::DistNetworkError {
 public:
  StoreUnreachableError(
      std::string message, int64_t sequence, std::vector<int64_t> lostRanks);

  int64_t sequence() const noexcept {
    return sequence_;
  }
  // The rank that hosts the store when this barrier created it ({0}); empty
  // for a store given to the barrier.
  const std::vector<int64_t>& lostRanks() const noexcept {
    return lostRanks_;
  }

 private:
  int64_t sequence_;
  std::vector<int64_t> lostRanks_;
};

namespace detail {
struct BarrierState;
struct BarrierAccess;
} // namespace detail

// A reusable barrier over a c10d::TCPStore that speaks the key protocol of
// torch.distributed.checkpoint._experimental.barriers.TCPStoreBarrier.
//
// One object per rank; it is not meant to be shared between threads. A round
// that times out or is interrupted stays entered: the next call resumes
// waiting for the same round instead of entering it twice. After a peer or
// the store host is lost, every call raises that error again.
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
      Protocol protocol = Protocol::kTorch,
      std::optional<std::chrono::milliseconds> peerTimeout =
          kDefaultPeerTimeout,
      TreeOptions tree = {});

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
  // before wait() has completed the round does nothing.
  void arrive();

  // Completes the round entered by arrive(): returns once every rank has
  // entered it. The time limit counts from this call.
  void wait();

  // Whether the round entered by arrive() is already released, so that a
  // wait() would return without blocking.
  bool released();

  // The sequence number of the next round to complete.
  int64_t sequence() const noexcept;
  bool usesLibUV() const noexcept;
  int64_t rank() const noexcept;
  int64_t worldSize() const noexcept;
  const std::string& barrierPrefix() const noexcept;
  std::chrono::milliseconds timeout() const noexcept;
  std::optional<std::chrono::milliseconds> peerTimeout() const noexcept;
  Protocol protocol() const noexcept;
  // kFlat or kTree, as chosen at construction.
  Topology topology() const noexcept;
  // How many stores of the tree this rank meets at (1 when flat).
  int64_t treeLevels() const noexcept;

  // A c10d view of the barrier's store: the store rank 0 hosts, the store
  // given to from_store, or on other ranks a client opened on first call.
  c10::intrusive_ptr<c10d::Store> store();

  // Called, without any lock held, about every 100 ms of a blocking call so
  // that an embedding runtime can act on signals; whatever it throws ends
  // the call and leaves the round entered.
  void setInterruptCheck(std::function<void()> check);

  // Leaves the store. The shutdown rule: the rank that hosts the store
  // (rank 0) waits, up to `timeout`, until every other rank of this library
  // on the store has closed (or been lost), so that no peer still finishing
  // the last round loses the store under it; other ranks only say that they
  // have closed, in their last request. torch's Python ranks never close and
  // are not waited for. A barrier over a store from elsewhere (from_store)
  // leaves it as it is. Destroying a barrier without close() says goodbye
  // on other ranks and tears rank 0's store down at once, unless its last
  // call ended in a timeout or a lost peer: then the store stays up, for a few
  // heartbeat intervals at most, until the survivors have the same verdict.
  // Idempotent; never throws for a store failure.
  void close();
  bool closed() const noexcept;

 private:
  friend struct detail::BarrierAccess;
  explicit TCPStoreBarrier(std::unique_ptr<detail::BarrierState> state);
  std::unique_ptr<detail::BarrierState> state_;
};

} // namespace tcpstore_barrier
