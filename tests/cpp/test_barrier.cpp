// C++ tests of the barrier core: ranks are threads of this process, each
// with its own TCPStoreBarrier on a real TCPStore on loopback.
//
// One executable, so that torch's headers are compiled once; each
// TEST_CASE(name) runs as `tcpstore_barrier_tests name` and is registered
// with ctest under its name (tests/cpp/CMakeLists.txt reads the names from
// this file).
#include <tcpstore_barrier/tcpstore_barrier.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

using namespace std::chrono_literals;
using tcpstore_barrier::BarrierTimeoutError;
using tcpstore_barrier::PeerLostError;
using tcpstore_barrier::StoreUnreachableError;
using tcpstore_barrier::TCPStoreBarrier;
using tcpstore_barrier::TCPStoreBarrierOptions;
using Clock = std::chrono::steady_clock;

namespace {

// ---------------------------------------------------------------------------
// A minimal harness: a failed check throws, main() reports it.
// ---------------------------------------------------------------------------
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::map<std::string, void (*)()>& registry() {
  static std::map<std::string, void (*)()> cases;
  return cases;
}

struct Register {
  Register(const char* name, void (*body)()) {
    registry().emplace(name, body);
  }
};

#define TEST_CASE(name)                          \
  void name();                                   \
  const Register name##_registered(#name, name); \
  void name()

template <typename T>
std::string show(const T& value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

std::string show(const std::vector<int64_t>& values) {
  std::string out = "[";
  for (std::size_t i = 0; i < values.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(values[i]);
  }
  return out + "]";
}

[[noreturn]] void fail(const char* file, int line, const std::string& what) {
  throw Failure(std::string(file) + ":" + std::to_string(line) + ": " + what);
}

#define REQUIRE(cond)                                 \
  do {                                                \
    if (!(cond)) {                                    \
      fail(__FILE__, __LINE__, "REQUIRE(" #cond ")"); \
    }                                                 \
  } while (0)

#define REQUIRE_EQ(actual, expected)                                         \
  do {                                                                       \
    const auto& actual_ = (actual);                                          \
    const auto& expected_ = (expected);                                      \
    if (!(actual_ == expected_)) {                                           \
      fail(                                                                  \
          __FILE__,                                                          \
          __LINE__,                                                          \
          #actual " is " + show(actual_) + ", expected " + show(expected_)); \
    }                                                                        \
  } while (0)

#define REQUIRE_CONTAINS(text, needle)                            \
  do {                                                            \
    const std::string text_ = (text);                             \
    if (text_.find(needle) == std::string::npos) {                \
      fail(                                                       \
          __FILE__,                                               \
          __LINE__,                                               \
          "'" + text_ + "' does not contain '" + (needle) + "'"); \
    }                                                             \
  } while (0)

// Checks that `expr` throws `Type` with `needle` in its message.
#define REQUIRE_THROWS(Type, expr, needle)                     \
  do {                                                         \
    bool thrown_ = false;                                      \
    try {                                                      \
      expr;                                                    \
    } catch (const Type& e) {                                  \
      thrown_ = true;                                          \
      REQUIRE_CONTAINS(e.what(), needle);                      \
    }                                                          \
    if (!thrown_) {                                            \
      fail(__FILE__, __LINE__, #expr " did not throw " #Type); \
    }                                                          \
  } while (0)

std::string describe(std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "unknown exception";
  }
}

// ---------------------------------------------------------------------------
// Ranks as threads.
// ---------------------------------------------------------------------------
constexpr const char* kLoopback = "127.0.0.1";

// A loopback port that was free a moment ago.
uint16_t freePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(addr);
  const bool ok =
      ::bind(fd, reinterpret_cast<sockaddr*>(&addr), length) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &length) == 0;
  ::close(fd);
  REQUIRE(ok);
  return ntohs(addr.sin_port);
}

TCPStoreBarrierOptions options(
    int64_t rank,
    int64_t worldSize,
    int64_t port,
    std::chrono::milliseconds timeout = 30s) {
  TCPStoreBarrierOptions o;
  o.globalRank = rank;
  o.globalWorldSize = worldSize;
  o.barrierPrefix = "ckpt";
  o.initTimeout = 30s;
  o.port = port;
  o.masterAddress = kLoopback;
  o.timeout = timeout;
  return o;
}

// Runs body(rank) on one thread per rank; rethrows the first failure with
// its rank. A rank that hangs is ended by ctest's TIMEOUT.
void runRanks(int64_t worldSize, const std::function<void(int64_t)>& body) {
  std::vector<std::exception_ptr> errors(worldSize);
  std::vector<std::thread> threads;
  for (int64_t rank = 0; rank < worldSize; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        body(rank);
      } catch (...) {
        errors[rank] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  std::string failures;
  for (int64_t rank = 0; rank < worldSize; ++rank) {
    if (errors[rank]) {
      failures +=
          "\n  rank " + std::to_string(rank) + ": " + describe(errors[rank]);
    }
  }
  if (!failures.empty()) {
    throw Failure("ranks failed:" + failures);
  }
}

// Lets ranks meet outside the barrier under test, with a bound so that a
// rank that died cannot hang the others.
class Latch {
 public:
  explicit Latch(int count) : count_(count) {}

  void arriveAndWait(std::chrono::milliseconds limit = 30s) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (--count_ == 0) {
      done_.notify_all();
    }
    if (!done_.wait_for(lock, limit, [this] {
          return count_ <= 0;
        })) {
      throw Failure("Latch: the other ranks did not arrive in time");
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable done_;
  int count_;
};

void waitUntil(const std::function<bool()>& condition, const char* what) {
  const auto deadline = Clock::now() + 20s;
  while (!condition()) {
    if (Clock::now() > deadline) {
      throw Failure(std::string("timed out waiting until ") + what);
    }
    std::this_thread::sleep_for(1ms);
  }
}

std::size_t openFdCount() {
  std::size_t count = 0;
  if (DIR* dir = ::opendir("/proc/self/fd")) {
    while (::readdir(dir) != nullptr) {
      ++count;
    }
    ::closedir(dir);
  }
  return count;
}

// ---------------------------------------------------------------------------
// A barrier: nobody leaves a round before everybody has entered it.
// ---------------------------------------------------------------------------
void checkNoEarlyRelease(
    int64_t worldSize,
    bool torchConstructor,
    std::optional<tcpstore_barrier::TreeOptions> tree = std::nullopt) {
  constexpr int kRounds = 200;
  const uint16_t port = freePort();
  std::vector<std::atomic<int64_t>> entered(kRounds);
  for (auto& count : entered) {
    count.store(0);
  }
  runRanks(worldSize, [&](int64_t rank) {
    auto rankOptions = options(rank, worldSize, port);
    if (tree) {
      rankOptions.tree = *tree;
      // Hosts of two ranks.
      rankOptions.tree.host = "host" + std::to_string(rank / 2);
    }
    auto barrier =
        torchConstructor
            ? std::make_unique<TCPStoreBarrier>(
                  rank, worldSize, "ckpt", 30, true, port, kLoopback, 30)
            : std::make_unique<TCPStoreBarrier>(rankOptions);
    std::mt19937 rng(static_cast<unsigned>(rank));
    std::uniform_int_distribution<int> jitterUs(0, 500);
    for (int s = 0; s < kRounds; ++s) {
      std::this_thread::sleep_for(std::chrono::microseconds(jitterUs(rng)));
      entered[s].fetch_add(1);
      barrier->executeBarrier();
      REQUIRE_EQ(entered[s].load(), worldSize);
      REQUIRE_EQ(barrier->sequence(), s + 1);
    }
    barrier->close();
  });
}

TEST_CASE(two_ranks_never_release_early) {
  checkNoEarlyRelease(2, /*torchConstructor=*/true);
}

TEST_CASE(four_ranks_never_release_early) {
  checkNoEarlyRelease(4, /*torchConstructor=*/false);
}

// Three levels: hosts of two, groups of two hosts' leaders, the root.
TEST_CASE(a_tree_of_stores_never_releases_early) {
  tcpstore_barrier::TreeOptions tree;
  tree.topology = tcpstore_barrier::Topology::kTree;
  tree.fanIn = 2;
  checkNoEarlyRelease(8, /*torchConstructor=*/false, tree);
}

TEST_CASE(a_tree_of_stores_says_where_each_rank_meets) {
  const uint16_t port = freePort();
  std::vector<int64_t> levels(6);
  runRanks(6, [&](int64_t rank) {
    auto rankOptions = options(rank, 6, port);
    rankOptions.tree.topology = tcpstore_barrier::Topology::kTree;
    rankOptions.tree.fanIn = 2;
    rankOptions.tree.host = "host" + std::to_string(rank / 2);
    TCPStoreBarrier barrier(rankOptions);
    REQUIRE(barrier.topology() == tcpstore_barrier::Topology::kTree);
    levels[rank] = barrier.treeLevels();
    barrier.executeBarrier();
    barrier.close();
  });
  // Hosts {0,1} {2,3} {4,5}; leaders 0, 2, 4 in groups {0,2} and {4}; the
  // root meets 0 and 4.
  REQUIRE(levels == (std::vector<int64_t>{3, 1, 2, 1, 2, 1}));
}

// ---------------------------------------------------------------------------
// Timeouts.
// ---------------------------------------------------------------------------
TEST_CASE(timeout_names_a_rank_that_never_arrived) {
  const uint16_t port = freePort();
  Latch timedOut(3);
  runRanks(3, [&](int64_t rank) {
    TCPStoreBarrier barrier(options(rank, 3, port, 500ms));
    if (rank != 2) {
      const auto start = Clock::now();
      try {
        barrier.executeBarrier();
        fail(__FILE__, __LINE__, "round 0 released without rank 2");
      } catch (const BarrierTimeoutError& e) {
        REQUIRE(Clock::now() - start >= 500ms);
        REQUIRE_EQ(e.missingRanks(), std::vector<int64_t>{2});
        REQUIRE_EQ(e.sequence(), 0);
        REQUIRE_EQ(e.barrierKey(), std::string("ckpt0/last_member"));
        REQUIRE(e.timeout() == 500ms);
        REQUIRE_CONTAINS(e.what_without_backtrace(), "missing ranks: [2]");
        REQUIRE_CONTAINS(
            e.what_without_backtrace(), "on rank " + std::to_string(rank));
      }
    }
    timedOut.arriveAndWait();
    barrier.close();
  });
}

TEST_CASE(a_rank_that_stops_heartbeating_is_named_lost_by_every_survivor) {
  const uint16_t port = freePort();
  Latch roundZero(3);
  Latch lost(2);
  runRanks(3, [&](int64_t rank) {
    auto o = options(rank, 3, port, 60s);
    o.peerTimeout = 500ms;
    auto barrier = std::make_unique<TCPStoreBarrier>(std::move(o));
    barrier->executeBarrier();
    roundZero.arriveAndWait();
    if (rank == 2) {
      // Gone without close(): its heartbeat stops with it.
      barrier.reset();
      return;
    }
    const auto start = Clock::now();
    try {
      barrier->executeBarrier();
      fail(__FILE__, __LINE__, "round 1 released without rank 2");
    } catch (const PeerLostError& e) {
      REQUIRE(Clock::now() - start < 5s);
      REQUIRE_EQ(e.lostRanks(), std::vector<int64_t>{2});
      REQUIRE_EQ(e.missingRanks(), std::vector<int64_t>{2});
      REQUIRE_EQ(e.sequence(), 1);
      REQUIRE_CONTAINS(e.what_without_backtrace(), "ranks [2] stopped showing");
    }
    // The barrier is over: a retry raises the same error at once.
    REQUIRE_THROWS(PeerLostError, barrier->executeBarrier(), "ranks [2]");
    lost.arriveAndWait();
    barrier->close();
  });
}

TEST_CASE(timeout_names_a_rank_left_a_round_behind) {
  const uint16_t port = freePort();
  Latch timedOut(3);
  runRanks(3, [&](int64_t rank) {
    TCPStoreBarrier barrier(options(rank, 3, port, 500ms));
    barrier.executeBarrier();
    if (rank != 2) {
      try {
        barrier.executeBarrier();
        fail(__FILE__, __LINE__, "round 1 released without rank 2");
      } catch (const BarrierTimeoutError& e) {
        REQUIRE_EQ(e.missingRanks(), std::vector<int64_t>{2});
        REQUIRE_EQ(e.sequence(), 1);
        REQUIRE_EQ(e.barrierKey(), std::string("ckpt1/last_member"));
      }
    }
    timedOut.arriveAndWait();
    barrier.close();
  });
}

TEST_CASE(resume_after_timeout_does_not_count_the_rank_twice) {
  const uint16_t port = freePort();
  Latch timedOut(3);
  std::atomic<bool> lateRankEntered{false};
  runRanks(3, [&](int64_t rank) {
    TCPStoreBarrier barrier(options(rank, 3, port, 1s));
    if (rank == 2) {
      timedOut.arriveAndWait();
      // Long enough that ranks 0 and 1 are waiting again, well within
      // their timeout.
      std::this_thread::sleep_for(300ms);
      lateRankEntered = true;
      barrier.executeBarrier();
    } else {
      REQUIRE_THROWS(
          BarrierTimeoutError, barrier.executeBarrier(), "missing ranks: [2]");
      REQUIRE_EQ(barrier.sequence(), 0);
      timedOut.arriveAndWait();
      // Entering round 0 again would make three members of two ranks and
      // release it before rank 2 came.
      barrier.executeBarrier();
      REQUIRE(lateRankEntered.load());
    }
    REQUIRE_EQ(barrier.sequence(), 1);
    barrier.executeBarrier();
    REQUIRE_EQ(barrier.sequence(), 2);
    barrier.close();
  });
}

// ---------------------------------------------------------------------------
// arrive() / wait().
// ---------------------------------------------------------------------------
TEST_CASE(arrive_returns_before_the_round_is_complete) {
  const uint16_t port = freePort();
  std::atomic<bool> firstArrived{false};
  runRanks(2, [&](int64_t rank) {
    TCPStoreBarrier barrier(options(rank, 2, port));
    if (rank == 0) {
      barrier.arrive();
      REQUIRE(!barrier.released());
      firstArrived = true;
      barrier.wait();
    } else {
      waitUntil(
          [&] {
            return firstArrived.load();
          },
          "rank 0 returned from arrive()");
      barrier.arrive();
      // The last to arrive releases the round and has nothing to wait for.
      REQUIRE(barrier.released());
      barrier.wait();
    }
    REQUIRE(!barrier.released());
    REQUIRE_EQ(barrier.sequence(), 1);
    barrier.close();
  });
}

TEST_CASE(released_turns_true_once_the_last_rank_arrives) {
  const uint16_t port = freePort();
  std::atomic<bool> firstArrived{false};
  runRanks(2, [&](int64_t rank) {
    TCPStoreBarrier barrier(options(rank, 2, port));
    if (rank == 0) {
      barrier.arrive();
      firstArrived = true;
      // Without calling wait(): the release is noticed in the background.
      waitUntil(
          [&] {
            return barrier.released();
          },
          "rank 0 saw the release");
    } else {
      waitUntil(
          [&] {
            return firstArrived.load();
          },
          "rank 0 returned from arrive()");
      barrier.arrive();
    }
    const auto start = Clock::now();
    barrier.wait();
    REQUIRE(Clock::now() - start < 100ms);
    REQUIRE_EQ(barrier.sequence(), 1);
    barrier.close();
  });
}

TEST_CASE(arrive_twice_enters_the_round_once) {
  const uint16_t port = freePort();
  std::atomic<int> arrivals{0};
  runRanks(3, [&](int64_t rank) {
    TCPStoreBarrier barrier(options(rank, 3, port));
    if (rank == 0) {
      barrier.arrive();
      barrier.arrive();
      arrivals = 1;
    } else if (rank == 1) {
      waitUntil(
          [&] {
            return arrivals.load() == 1;
          },
          "rank 0 arrived");
      barrier.arrive();
      REQUIRE(!barrier.released());
      arrivals = 2;
    } else {
      waitUntil(
          [&] {
            return arrivals.load() == 2;
          },
          "rank 1 arrived");
      barrier.arrive();
      REQUIRE(barrier.released());
    }
    barrier.wait();
    REQUIRE_EQ(barrier.sequence(), 1);
    barrier.close();
  });
}

TEST_CASE(wait_before_arrive_throws_logic_error) {
  TCPStoreBarrier barrier(options(0, 1, freePort()));
  REQUIRE_THROWS(
      std::logic_error, barrier.wait(), "wait() called before arrive()");
  barrier.executeBarrier();
  REQUIRE_EQ(barrier.sequence(), 1);
  barrier.close();
}

// ---------------------------------------------------------------------------
// Construction and teardown.
// ---------------------------------------------------------------------------
TEST_CASE(invalid_arguments_throw_before_any_socket) {
  // Nothing listens here: a rank that tried to connect would retry for
  // initTimeout (30 s), one that tried to host would wait as long for peers.
  const uint16_t port = freePort();
  const std::size_t fdsBefore = openFdCount();
  const auto start = Clock::now();

  auto with = [&](int64_t rank,
                  const std::function<void(TCPStoreBarrierOptions&)>& change) {
    auto o = options(rank, 3, port);
    change(o);
    TCPStoreBarrier barrier(std::move(o));
  };
  REQUIRE_THROWS(std::invalid_argument, with(3, [](auto&) {}), "global_rank");
  REQUIRE_THROWS(std::invalid_argument, with(-1, [](auto&) {}), "global_rank");
  REQUIRE_THROWS(
      std::invalid_argument,
      with(
          0,
          [](auto& o) {
            o.globalWorldSize = 0;
          }),
      "global_world_size");
  REQUIRE_THROWS(
      std::invalid_argument,
      with(
          0,
          [](auto& o) {
            o.port = 0;
          }),
      "tcpstore_port");
  REQUIRE_THROWS(
      std::invalid_argument,
      with(
          1,
          [](auto& o) {
            o.port = 65536;
          }),
      "tcpstore_port");
  REQUIRE_THROWS(
      std::invalid_argument,
      with(
          1,
          [](auto& o) {
            o.masterAddress.clear();
          }),
      "master_address");
  REQUIRE_THROWS(
      std::invalid_argument,
      with(
          0,
          [](auto& o) {
            o.timeout = -1ms;
          }),
      "timeout_secs");
  REQUIRE_THROWS(
      std::invalid_argument,
      with(
          1,
          [](auto& o) {
            o.initTimeout = -1ms;
          }),
      "timeout_barrier_init_secs");
  REQUIRE_THROWS(
      std::invalid_argument,
      with(
          1,
          [](auto& o) {
            o.peerTimeout = 0ms;
          }),
      "peer_timeout_secs");
  REQUIRE_THROWS(
      std::invalid_argument,
      TCPStoreBarrier(1, 3, "ckpt", 30, true, port, kLoopback, -1),
      "timeout_secs");
  REQUIRE_THROWS(
      std::invalid_argument,
      TCPStoreBarrier(0, 3, "ckpt", -1, true, port, kLoopback, 30),
      "timeout_barrier_init_secs");
  REQUIRE_THROWS(
      std::invalid_argument,
      TCPStoreBarrier(c10::intrusive_ptr<c10d::Store>(), 0, 1, "ckpt", 1s),
      "store");

  REQUIRE(Clock::now() - start < 2s);
  REQUIRE_EQ(openFdCount(), fdsBefore);
}

TEST_CASE(from_store_barrier_uses_the_callers_store) {
  c10d::TCPStoreOptions serverOptions;
  serverOptions.port = 0;
  serverOptions.isServer = true;
  serverOptions.waitWorkers = false;
  serverOptions.timeout = 30s;
  auto server = c10::make_intrusive<c10d::TCPStore>(kLoopback, serverOptions);

  constexpr int kRounds = 20;
  std::vector<std::atomic<int64_t>> entered(kRounds);
  for (auto& count : entered) {
    count.store(0);
  }
  runRanks(3, [&](int64_t rank) {
    c10::intrusive_ptr<c10d::Store> store = server;
    if (rank != 0) {
      c10d::TCPStoreOptions clientOptions;
      clientOptions.port = server->getPort();
      clientOptions.waitWorkers = false;
      clientOptions.timeout = 30s;
      store = c10::make_intrusive<c10d::TCPStore>(kLoopback, clientOptions);
    }
    TCPStoreBarrier barrier(store, rank, 3, "ckpt", 30s);
    REQUIRE_EQ(barrier.usesLibUV(), server->isLibUvBackend());
    for (int s = 0; s < kRounds; ++s) {
      entered[s].fetch_add(1);
      barrier.executeBarrier();
      REQUIRE_EQ(entered[s].load(), 3);
    }
    // torch's protocol: each rank announces the round it last joined.
    const auto announced = store->get("rank" + std::to_string(rank));
    REQUIRE_EQ(
        std::string(announced.begin(), announced.end()),
        std::to_string(kRounds - 1));
    barrier.close();
    REQUIRE(barrier.closed());
    // The store is the caller's: closing the barrier leaves it usable.
    store->set("still_open/" + std::to_string(rank), std::vector<uint8_t>{1});
  });
}

TEST_CASE(host_close_waits_for_every_rank_to_close) {
  const uint16_t port = freePort();
  std::atomic<bool> lateRankClosing{false};
  runRanks(2, [&](int64_t rank) {
    TCPStoreBarrier barrier(options(rank, 2, port));
    barrier.executeBarrier();
    if (rank == 1) {
      std::this_thread::sleep_for(300ms);
      lateRankClosing = true;
      barrier.close();
      return;
    }
    // Rank 1 may still be inside the last round: the store must outlive it.
    barrier.close();
    REQUIRE(lateRankClosing.load());
  });
}

// A handler written from the Python docs catches the same errors in C++:
// a lost store is a DistNetworkError, not a timeout; a lost peer is a
// timeout (BarrierTimeoutError, a DistStoreError).
TEST_CASE(store_unreachable_error_is_a_dist_network_error_and_not_a_timeout) {
  const uint16_t port = freePort();
  Latch joined(2);
  Latch waiting(2);
  runRanks(2, [&](int64_t rank) {
    auto barrier = std::make_unique<TCPStoreBarrier>(options(rank, 2, port));
    joined.arriveAndWait();
    if (rank == 0) {
      waiting.arriveAndWait();
      // Rank 1's arrival is on the store; the host goes without close(),
      // between rounds, so its store goes at once.
      std::this_thread::sleep_for(200ms);
      barrier.reset();
      return;
    }
    waiting.arriveAndWait();
    bool caughtAsTimeout = false;
    bool caughtAsNetworkError = false;
    try {
      barrier->executeBarrier();
    } catch (const BarrierTimeoutError&) {
      caughtAsTimeout = true;
    } catch (const c10::DistNetworkError& e) {
      caughtAsNetworkError = true;
      const auto* unreachable = dynamic_cast<const StoreUnreachableError*>(&e);
      REQUIRE(unreachable != nullptr);
      REQUIRE_EQ(unreachable->lostRanks(), std::vector<int64_t>{0});
      REQUIRE_EQ(unreachable->sequence(), 0);
      REQUIRE_CONTAINS(e.what_without_backtrace(), "is gone");
    }
    REQUIRE(!caughtAsTimeout);
    REQUIRE(caughtAsNetworkError);
    // Every later call raises it again, as the same type.
    REQUIRE_THROWS(StoreUnreachableError, barrier->executeBarrier(), "is gone");
    barrier->close();
  });
}

TEST_CASE(peer_lost_error_is_a_barrier_timeout_and_a_dist_store_error) {
  static_assert(std::is_base_of_v<BarrierTimeoutError, PeerLostError>);
  static_assert(std::is_base_of_v<c10::DistStoreError, BarrierTimeoutError>);
  static_assert(
      std::is_base_of_v<c10::DistNetworkError, StoreUnreachableError>);
  static_assert(!std::is_base_of_v<BarrierTimeoutError, StoreUnreachableError>);
}

// Destruction without close() stops the worker before it releases what the
// worker's jobs use, whatever they are doing: a batch of deletes waiting
// for the barrier to be quiet, re-posting itself, or talking to the store.
// The sanitizer builds of this test catch a job reading freed state.
TEST_CASE(destroying_a_barrier_in_the_middle_of_deletes_is_safe) {
  constexpr int kTries = 12;
  std::mt19937 rng(7);
  for (int attempt = 0; attempt < kTries; ++attempt) {
    const uint16_t port = freePort();
    // Around the 50 ms of quiet after which the queued deletes start.
    const auto pause = std::chrono::milliseconds(
        std::uniform_int_distribution<int>(20, 80)(rng));
    Latch done(2);
    runRanks(2, [&](int64_t rank) {
      auto barrier = std::make_unique<TCPStoreBarrier>(options(rank, 2, port));
      for (int round = 0; round < 130; ++round) {
        barrier->executeBarrier();
      }
      done.arriveAndWait();
      std::this_thread::sleep_for(rank == 0 ? pause : pause / 2);
      barrier.reset();
    });
  }
}

TEST_CASE(closed_barrier_rejects_rounds_and_closes_once) {
  TCPStoreBarrier barrier(options(0, 1, freePort()));
  barrier.close();
  REQUIRE(barrier.closed());
  REQUIRE_THROWS(std::logic_error, barrier.executeBarrier(), "is closed");
  REQUIRE_THROWS(std::logic_error, barrier.arrive(), "is closed");
  barrier.close();
}

} // namespace

int main(int argc, char** argv) {
  const auto& cases = registry();
  if (argc != 2 || std::string(argv[1]) == "--list") {
    for (const auto& [name, body] : cases) {
      std::printf("%s\n", name.c_str());
    }
    return argc == 2 ? 0 : 2;
  }
  const auto found = cases.find(argv[1]);
  if (found == cases.end()) {
    std::fprintf(
        stderr, "no test case named '%s' (--list lists them)\n", argv[1]);
    return 2;
  }
  const auto start = Clock::now();
  try {
    found->second();
  } catch (...) {
    std::fprintf(
        stderr,
        "FAIL %s: %s\n",
        argv[1],
        describe(std::current_exception()).c_str());
    return 1;
  }
  std::printf(
      "PASS %s (%lld ms)\n",
      argv[1],
      static_cast<long long>(
          std::chrono::duration_cast<std::chrono::milliseconds>(
              Clock::now() - start)
              .count()));
  return 0;
}
