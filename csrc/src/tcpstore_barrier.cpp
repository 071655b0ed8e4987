#include <tcpstore_barrier/tcpstore_barrier.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <stdexcept>
#include <string_view>
#include <thread>
#include <utility>

#include <c10/util/Logging.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "sockets.h"
#include "release_watcher.h"

namespace tcpstore_barrier {
namespace {

// Key names of torch.distributed.elastic.utils.store.barrier: a round is
// released by its last member setting `last_member`.
constexpr std::string_view kNumMembersSuffix = "/num_members";
constexpr std::string_view kLastMemberSuffix = "/last_member";
constexpr std::string_view kServerBarrierSuffix = "/barrier";
constexpr std::string_view kReleasedValue = "<val_ignored>";
const std::vector<uint8_t> kReleasedBytes(
    kReleasedValue.begin(),
    kReleasedValue.end());
// Outside any round's key space: round keys are `{prefix}{digits}/...`.
constexpr std::string_view kMembersSuffix = "/library_ranks";
constexpr std::string_view kAllMembersSuffix = "/all_library_ranks";
constexpr std::string_view kClosedSuffix = "/closed";
constexpr std::string_view kAllClosedSuffix = "/all_closed";

// How often a blocked caller checks for interrupts: well under the half
// second in which a Ctrl-C must be acted on. The check is local (a
// condition variable), so it costs no store traffic.
constexpr std::chrono::milliseconds kInterruptSlice{100};
// How long a caller that checks for interrupts first waits on its own
// connection, where it cannot act on them: together with kInterruptSlice
// this stays under the half second.
constexpr std::chrono::milliseconds kInlineWait{200};

// Finished rounds' keys are deleted every this many rounds, and at most
// kMaxQueuedCleanups batches wait for the watcher before the caller deletes
// one itself: the store holds a few dozen keys besides one per rank.
constexpr int64_t kCleanupEvery = 4;
constexpr std::size_t kMaxQueuedCleanups = 2;

// How long rank 0's close() waits for peers to register when no round has
// completed yet (after one has, every rank of the round had registered).
constexpr std::chrono::milliseconds kFirstRegistrationGrace{2000};

// TCPStore keeps timeouts in milliseconds; beyond this a timeout is a typo.
constexpr double kMaxTimeoutSeconds = 365.0 * 24 * 3600;

c10::SourceLocation here(const char* function, int line) {
  return {function, __FILE__, static_cast<uint32_t>(line)};
}

void appendInt(std::string& out, int64_t value) {
  char digits[24];
  auto [end, ec] = std::to_chars(digits, digits + sizeof(digits), value);
  (void)ec;
  out.append(digits, end);
}

std::string roundKey(
    const std::string& prefix,
    int64_t sequence,
    std::string_view suffix) {
  std::string key = prefix;
  appendInt(key, sequence);
  key.append(suffix);
  return key;
}

std::string rankKeyOf(int64_t rank) {
  std::string key = "rank";
  appendInt(key, rank);
  return key;
}

std::optional<int64_t> parseInt(const std::vector<uint8_t>& bytes) {
  int64_t value = 0;
  const char* first = reinterpret_cast<const char*>(bytes.data());
  const char* last = first + bytes.size();
  auto [end, ec] = std::from_chars(first, last, value);
  if (ec != std::errc() || end != last) {
    return std::nullopt;
  }
  return value;
}

// Steps 1-3 of torch's protocol for one round; true when this rank arrived
// last and so released the round.
bool enterTorchRound(
    c10d::Store& store,
    const std::string& rankKey,
    const std::vector<uint8_t>& sequence,
    const std::string& numMembersKey,
    const std::string& releaseKey,
    int64_t worldSize) {
  // torch's class announces the round it joins under `rank{r}` first; the
  // value is what names a missing rank when a round times out. A set has no
  // reply, so it costs no round trip of its own.
  store.set(rankKey, sequence);
  if (store.add(numMembersKey, 1) < worldSize) {
    return false;
  }
  // The last arriver releases the others and has nothing to wait for.
  store.set(releaseKey, kReleasedBytes);
  return true;
}

std::string seconds(std::chrono::milliseconds timeout) {
  return fmt::format("{:g} s", static_cast<double>(timeout.count()) / 1000.0);
}

void checkRankAndWorld(int64_t rank, int64_t worldSize) {
  if (worldSize < 1) {
    throw std::invalid_argument(fmt::format(
        "global_world_size must be at least 1, got {}", worldSize));
  }
  if (rank < 0 || rank >= worldSize) {
    throw std::invalid_argument(fmt::format(
        "global_rank must be in [0, global_world_size={}), got {}",
        worldSize,
        rank));
  }
}

void checkNonNegative(std::chrono::milliseconds timeout, const char* name) {
  if (timeout.count() < 0) {
    throw std::invalid_argument(fmt::format(
        "{} must not be negative, got {} ms", name, timeout.count()));
  }
}

// c10 errors append a C++ backtrace to what(); a message that wraps one
// should carry only its text.
const char* withoutBacktrace(const std::exception& e) {
  if (const auto* error = dynamic_cast<const c10::Error*>(&e)) {
    return error->what_without_backtrace();
  }
  return e.what();
}

std::string describeStore(const c10::intrusive_ptr<c10d::Store>& store) {
  if (auto* tcp = dynamic_cast<c10d::TCPStore*>(store.get())) {
    return fmt::format("the store at {}:{}", tcp->getHost(), tcp->getPort());
  }
  return "the store given to from_store";
}

} // namespace

uint16_t checkedPort(int64_t port) {
  if (port < 1 || port > 65535) {
    throw std::invalid_argument(
        fmt::format("tcpstore_port must be in 1..65535, got {}", port));
  }
  return static_cast<uint16_t>(port);
}

std::chrono::milliseconds checkedTimeout(double seconds, const char* name) {
  if (std::isnan(seconds) || seconds < 0 || seconds > kMaxTimeoutSeconds) {
    throw std::invalid_argument(fmt::format(
        "{} must be a number of seconds in [0, {:g}], got {}",
        name,
        kMaxTimeoutSeconds,
        seconds));
  }
  return std::chrono::milliseconds(std::llround(seconds * 1000.0));
}

BarrierTimeoutError::BarrierTimeoutError(
    std::string barrierKey,
    int64_t sequence,
    std::chrono::milliseconds timeout,
    std::vector<int64_t> missingRanks,
    int64_t rank,
    int64_t worldSize)
    : c10::DistStoreError(
          here(__func__, __LINE__),
          fmt::format(
              "TCPStoreBarrier timed out after {} on rank {} (world size {}) "
              "at barrier key '{}' (sequence {}); missing ranks: [{}]",
              seconds(timeout),
              rank,
              worldSize,
              barrierKey,
              sequence,
              fmt::join(missingRanks, ", "))),
      barrierKey_(std::move(barrierKey)),
      sequence_(sequence),
      timeout_(timeout),
      missingRanks_(std::move(missingRanks)) {}

TCPStoreBarrier::TCPStoreBarrier(
    int64_t global_rank,
    int64_t global_world_size,
    std::string barrier_prefix,
    int64_t timeout_barrier_init_secs,
    bool use_checkpoint_barrier_tcpstore_libuv,
    uint16_t tcpstore_port,
    std::string master_address,
    int64_t timeout_secs)
    : TCPStoreBarrier(TCPStoreBarrierOptions{
          global_rank,
          global_world_size,
          std::move(barrier_prefix),
          checkedTimeout(
              static_cast<double>(timeout_barrier_init_secs),
              "timeout_barrier_init_secs"),
          use_checkpoint_barrier_tcpstore_libuv,
          tcpstore_port,
          std::move(master_address),
          checkedTimeout(static_cast<double>(timeout_secs), "timeout_secs"),
          Protocol::kTorch}) {}

TCPStoreBarrier::TCPStoreBarrier(TCPStoreBarrierOptions options)
    : rank_(options.globalRank),
      worldSize_(options.globalWorldSize),
      prefix_(std::move(options.barrierPrefix)),
      timeout_(options.timeout),
      protocol_(options.protocol),
      ownsStore_(true),
      hostsStore_(options.globalRank == 0) {
  checkRankAndWorld(rank_, worldSize_);
  const uint16_t port = checkedPort(options.port);
  if (options.masterAddress.empty()) {
    throw std::invalid_argument("master_address must not be empty");
  }
  if (options.masterAddress.find('\0') != std::string::npos) {
    throw std::invalid_argument("master_address must not contain a NUL character");
  }
  checkNonNegative(options.initTimeout, "timeout_barrier_init_secs");
  checkNonNegative(timeout_, "timeout_secs");

  c10d::TCPStoreOptions storeOptions;
  storeOptions.port = port;
  storeOptions.isServer = hostsStore_;
  storeOptions.numWorkers = static_cast<std::size_t>(worldSize_);
  storeOptions.waitWorkers = true;
  storeOptions.timeout = options.initTimeout;
  storeOptions.useLibUV = options.useLibUV;
  if (hostsStore_) {
    // TCPStore's own server listens on every interface; binding the socket
    // here keeps it on the interface of master_address.
    storeOptions.masterListenFd =
        openListenSocket(options.masterAddress, port).release();
  }
  storeAddress_ =
      fmt::format("the store at {}:{}", options.masterAddress, port);
  try {
    if (!hostsStore_) {
      const auto start = std::chrono::steady_clock::now();
      waitUntilReachable(
          options.masterAddress, port, start + options.initTimeout);
      storeOptions.timeout = std::max(
          std::chrono::ceil<std::chrono::milliseconds>(
              start + options.initTimeout - std::chrono::steady_clock::now()),
          std::chrono::milliseconds(1));
    }
    auto store = c10::make_intrusive<c10d::TCPStore>(
        options.masterAddress, storeOptions);
    store->setTimeout(options.initTimeout);
    usesLibUV_ = store->isLibUvBackend();
    // Counted so that close() on rank 0 knows how many ranks to wait for.
    if (store->add(bookkeepingKey(kMembersSuffix), 1) == worldSize_) {
      store->set(bookkeepingKey(kAllMembersSuffix), kReleasedBytes);
    }
    store_ = std::move(store);
  } catch (const c10::DistStoreError& e) {
    throw c10::DistStoreError(
        here(__func__, __LINE__),
        fmt::format(
            "TCPStoreBarrier rank {} of {}: {} did not gather "
            "all ranks within timeout_barrier_init_secs={}: {}",
            rank_,
            worldSize_,
            storeAddress_,
            seconds(options.initTimeout),
            e.what_without_backtrace()));
  } catch (const c10::DistNetworkError& e) {
    throw c10::DistNetworkError(
        here(__func__, __LINE__),
        fmt::format(
            "TCPStoreBarrier rank {} of {}: cannot reach {} "
            "within timeout_barrier_init_secs={}: {}",
            rank_,
            worldSize_,
            storeAddress_,
            seconds(options.initTimeout),
            e.what_without_backtrace()));
  }
  prepareRoundKeys();
  startWatcher();
  LOG(INFO) << "TCPStoreBarrier rank " << rank_ << " of " << worldSize_
            << " joined " << storeAddress_ << " (prefix '" << prefix_
            << "', " << (usesLibUV_ ? "libuv" : "legacy") << " server, "
            << (protocol_ == Protocol::kTorch ? "torch" : "native")
            << " protocol, timeout " << seconds(timeout_) << ")";
}

TCPStoreBarrier::TCPStoreBarrier(
    c10::intrusive_ptr<c10d::Store> store,
    int64_t global_rank,
    int64_t global_world_size,
    std::string barrier_prefix,
    std::chrono::milliseconds timeout,
    Protocol protocol)
    : store_(std::move(store)),
      rank_(global_rank),
      worldSize_(global_world_size),
      prefix_(std::move(barrier_prefix)),
      timeout_(timeout),
      protocol_(protocol) {
  if (!store_) {
    throw std::invalid_argument("store must not be null");
  }
  checkRankAndWorld(rank_, worldSize_);
  checkNonNegative(timeout_, "timeout_secs");
  if (auto* tcp = dynamic_cast<c10d::TCPStore*>(store_.get())) {
    usesLibUV_ = tcp->isLibUvBackend();
  }
  storeAddress_ = describeStore(store_);
  prepareRoundKeys();
  startWatcher();
}

TCPStoreBarrier::~TCPStoreBarrier() = default;

void TCPStoreBarrier::setInterruptCheck(std::function<void()> check) {
  interruptCheck_ = std::move(check);
}

void TCPStoreBarrier::prepareRoundKeys() {
  if (rankKey_.empty()) {
    rankKey_ = rankKeyOf(rank_);
    releaseKey_.resize(1);
  }
  sequenceText_.clear();
  appendInt(sequenceText_, sequence_);
  sequenceValue_.assign(sequenceText_.begin(), sequenceText_.end());

  numMembersKey_.assign(prefix_);
  numMembersKey_.append(sequenceText_);
  numMembersKey_.append(kNumMembersSuffix);

  std::string& releaseKey = releaseKey_.front();
  releaseKey.assign(prefix_);
  releaseKey.append(sequenceText_);
  releaseKey.append(
      protocol_ == Protocol::kTorch ? kLastMemberSuffix : kServerBarrierSuffix);
}

std::string TCPStoreBarrier::bookkeepingKey(std::string_view suffix) const {
  std::string key = prefix_;
  key.append(suffix);
  return key;
}

void TCPStoreBarrier::checkOpen() const {
  if (!store_) {
    throw std::logic_error(fmt::format(
        "TCPStoreBarrier rank {} (prefix '{}') is closed", rank_, prefix_));
  }
}

void TCPStoreBarrier::executeBarrier() {
  checkOpen();
  const auto deadline = std::chrono::steady_clock::now() + timeout_;
  if (!arrived_) {
    try {
      enterRound();
      if (!released_) {
        waitInline(deadline);
      }
    } catch (const c10::DistNetworkError& e) {
      rethrowStoreFailure(e);
    }
  }
  completeRound(deadline);
}

void TCPStoreBarrier::waitInline(
    std::chrono::steady_clock::time_point deadline) {
  // Most rounds release within moments: waiting on this thread's own
  // connection then saves two thread hand-offs per round. A caller that
  // must act on interrupts meanwhile moves on to the watcher after a short
  // first wait (c10d logs a warning each time a wait times out, so this
  // happens at most once per round). So does every native round: only a
  // round that is slow to release writes this rank's `rank{r}` key, which
  // halves the store's work per round.
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  auto slice = std::chrono::ceil<std::chrono::milliseconds>(deadline - start);
  if (interruptCheck_ || protocol_ == Protocol::kNative) {
    slice = std::min(slice, kInlineWait);
  }
  if (slice.count() <= 0) {
    return;
  }
  try {
    if (protocol_ == Protocol::kTorch) {
      store_->wait(releaseKey_, slice);
    } else {
      store_->barrier(releaseKey_.front(), worldSize_, slice);
    }
    released_ = true;
  } catch (const c10::DistStoreError&) {
    if (Clock::now() < start + slice) {
      throw;
    }
  }
  if (!released_ && protocol_ == Protocol::kNative) {
    // The server counts a cancelled BARRIER request; the watcher must not
    // send another.
    watcher().markJoined(releaseKey_.front());
    announceArrival();
  }
}

void TCPStoreBarrier::arrive() {
  startArrival();
  finishArrival();
}

void TCPStoreBarrier::startArrival() {
  checkOpen();
  if (arrived_) {
    return;
  }
  // The arrival's round trips run on the watcher's thread and connection,
  // followed by the watch for the release: a wait() after other work may
  // then find the round already released, and a Python caller can wait for
  // the arrival itself without giving up the GIL.
  std::function<bool(c10d::Store&)> arrival;
  if (protocol_ == Protocol::kTorch) {
    arrival = [rankKey = rankKey_,
               sequence = sequenceValue_,
               numMembersKey = numMembersKey_,
               releaseKey = releaseKey_.front(),
               worldSize = worldSize_](c10d::Store& store) {
      return enterTorchRound(
          store, rankKey, sequence, numMembersKey, releaseKey, worldSize);
    };
  } else {
    arrival = [rankKey = rankKey_,
               sequence = sequenceValue_](c10d::Store& store) {
      store.set(rankKey, sequence);
      return false;
    };
  }
  arrived_ = true;
  watchRelease(std::chrono::steady_clock::now() + timeout_, std::move(arrival));
}

bool TCPStoreBarrier::awaitArrival(std::chrono::milliseconds patience) {
  checkOpen();
  try {
    return watcher().awaitArrival(std::chrono::steady_clock::now() + patience);
  } catch (const std::exception& e) {
    rethrowStoreFailure(e);
  }
}

void TCPStoreBarrier::finishArrival() {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + timeout_;
  for (;;) {
    const auto until = nextInterruptCheck(deadline);
    if (awaitArrival(
            std::chrono::ceil<std::chrono::milliseconds>(until - Clock::now()))) {
      return;
    }
    if (Clock::now() >= deadline) {
      throw c10::DistNetworkError(
          here(__func__, __LINE__),
          fmt::format(
              "TCPStoreBarrier rank {} of {}: {} did not answer this rank's "
              "arrival at sequence {} within timeout_secs={}",
              rank_,
              worldSize_,
              storeAddress_,
              sequence_,
              seconds(timeout_)));
    }
    if (interruptCheck_) {
      interruptCheck_();
    }
  }
}

std::chrono::steady_clock::time_point TCPStoreBarrier::nextInterruptCheck(
    std::chrono::steady_clock::time_point deadline) const {
  if (!interruptCheck_) {
    return deadline;
  }
  return std::min(deadline, std::chrono::steady_clock::now() + kInterruptSlice);
}

bool TCPStoreBarrier::released() const {
  return released_ ||
      (watcher_ && watcher_->status() == ReleaseWatcher::Status::kReleased);
}

void TCPStoreBarrier::watchRelease(
    std::chrono::steady_clock::time_point deadline,
    std::function<bool(c10d::Store&)> arrival) {
  watcher().watch(
      releaseKey_.front(),
      deadline,
      protocol_ == Protocol::kTorch ? ReleaseWatcher::Kind::kKey
                                    : ReleaseWatcher::Kind::kServerBarrier,
      worldSize_,
      std::move(arrival));
}

ReleaseWatcher& TCPStoreBarrier::watcher() {
  return *watcher_;
}

void TCPStoreBarrier::startWatcher() {
  // Opened here rather than on first need: a connect can stall (c10d looks
  // up the peer's name), which belongs in construction, not in a round.
  try {
    watcher_ = std::make_unique<ReleaseWatcher>(store_->clone());
  } catch (const c10::DistNetworkError& e) {
    rethrowStoreFailure(e);
  }
}

void TCPStoreBarrier::announceArrival() {
  store_->set(rankKey_, sequenceValue_);
}

void TCPStoreBarrier::enterRound() {
  // A native arrival is the server BARRIER request itself, sent by the wait.
  if (protocol_ == Protocol::kTorch) {
    released_ = enterTorchRound(
        *store_,
        rankKey_,
        sequenceValue_,
        numMembersKey_,
        releaseKey_.front(),
        worldSize_);
  }
  // Only now: a store that failed mid-arrival must not leave the rank
  // marked as entered, or a retry would never arrive.
  arrived_ = true;
}

void TCPStoreBarrier::wait() {
  checkOpen();
  if (!arrived_) {
    throw std::logic_error(fmt::format(
        "TCPStoreBarrier rank {}: wait() called before arrive() for "
        "sequence {}",
        rank_,
        sequence_));
  }
  completeRound(std::chrono::steady_clock::now() + timeout_);
}

void TCPStoreBarrier::completeRound(
    std::chrono::steady_clock::time_point deadline) {
  if (!released_) {
    waitForRelease(deadline);
  }
  deleteFinishedRounds();
  finishRound();
}

void TCPStoreBarrier::finishRound() {
  arrived_ = false;
  released_ = false;
  watcher().reset();
  ++sequence_;
  prepareRoundKeys();
}

void TCPStoreBarrier::waitForRelease(
    std::chrono::steady_clock::time_point deadline) {
  using Clock = std::chrono::steady_clock;
  using Status = ReleaseWatcher::Status;
  ReleaseWatcher& releases = watcher();
  // Extends a watch started by arrive(): the time limit counts from here.
  watchRelease(deadline);
  for (;;) {
    const auto until = nextInterruptCheck(deadline);
    const Status status = releases.waitUntil(until);
    if (status == Status::kReleased) {
      released_ = true;
      return;
    }
    if (status == Status::kFailed) {
      try {
        std::rethrow_exception(releases.failure());
      } catch (const std::exception& e) {
        rethrowStoreFailure(e);
      }
    }
    if (Clock::now() >= deadline) {
      std::vector<int64_t> missing;
      try {
        missing = missingRanks();
      } catch (const c10::DistNetworkError& e) {
        rethrowStoreFailure(e);
      }
      throw BarrierTimeoutError(
          releaseKey_.front(), sequence_, timeout_, missing, rank_,
          worldSize_);
    }
    if (status == Status::kExpired) {
      watchRelease(deadline);
    }
    if (interruptCheck_) {
      interruptCheck_();
    }
  }
}

std::vector<int64_t> TCPStoreBarrier::missingRanks() {
  auto missing = ranksBehind();
  if (protocol_ != Protocol::kNative) {
    return missing;
  }
  // A native rank writes its `rank{r}` key only once its round has been
  // slow for kInlineWait, so a rank that arrived just before this timeout
  // may not have written it yet: the server's count says how many arrived.
  const auto count = [&] {
    if (!store_->check(releaseKey_)) {
      return int64_t{0};
    }
    return parseInt(store_->get(releaseKey_.front())).value_or(0);
  };
  const auto giveUp =
      std::chrono::steady_clock::now() + kInlineWait + kInterruptSlice;
  while (worldSize_ - static_cast<int64_t>(missing.size()) < count() &&
         std::chrono::steady_clock::now() < giveUp) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    missing = ranksBehind();
  }
  return missing;
}

std::vector<int64_t> TCPStoreBarrier::ranksBehind() {
  std::vector<std::string> keys;
  keys.reserve(static_cast<std::size_t>(worldSize_));
  for (int64_t r = 0; r < worldSize_; ++r) {
    keys.push_back(rankKeyOf(r));
  }
  std::vector<std::optional<int64_t>> rounds(keys.size());
  // Once every rank has entered some round, all `rank{r}` keys exist and
  // one multiGet reads them; before that, a rank without a key is missing.
  if (store_->check(keys)) {
    auto values = store_->multiGet(keys);
    for (std::size_t i = 0; i < values.size(); ++i) {
      rounds[i] = parseInt(values[i]);
    }
  } else {
    for (std::size_t i = 0; i < keys.size(); ++i) {
      if (store_->check({keys[i]})) {
        rounds[i] = parseInt(store_->get(keys[i]));
      }
    }
  }
  std::vector<int64_t> missing;
  for (std::size_t i = 0; i < rounds.size(); ++i) {
    if (!rounds[i] || *rounds[i] < sequence_) {
      missing.push_back(static_cast<int64_t>(i));
    }
  }
  return missing;
}

void TCPStoreBarrier::deleteFinishedRounds() {
  // Round s has released, so every rank has returned from round s-1 and the
  // keys of rounds up to s-1 are no longer read. They are deleted in
  // batches on the watcher's connection: off the caller's path, with one
  // thread wake-up per batch. Should batches pile up (rounds outpacing
  // deletes, as in a tight loop of a few ranks), this one runs here
  // instead, so that the store stays bounded.
  if (sequence_ == 0 || sequence_ % kCleanupEvery != 0) {
    return;
  }
  // The ranks take turns, so that no one connection carries every delete.
  if ((sequence_ / kCleanupEvery) % worldSize_ != rank_) {
    return;
  }
  const int64_t newest = sequence_ - 1;
  std::function<void(c10d::Store&)> job;
  if (protocol_ == Protocol::kNative) {
    job = [prefix = prefix_, newest](c10d::Store& store) {
      for (int64_t old = newest; old > newest - kCleanupEvery; --old) {
        store.deleteKey(roundKey(prefix, old, kServerBarrierSuffix));
      }
    };
  } else {
    // A torch rank never takes its turn, so walk back past this batch
    // until a round is found already deleted. Walkers that meet stop at
    // each other's deletes; the one still deleting carries on down, so no
    // round is skipped.
    job = [prefix = prefix_, newest](c10d::Store& store) {
      for (int64_t old = newest; old >= 0; --old) {
        if (!store.deleteKey(roundKey(prefix, old, kNumMembersSuffix))) {
          return;
        }
        store.deleteKey(roundKey(prefix, old, kLastMemberSuffix));
      }
    };
  }
  if (watcher().backgroundJobs() >= kMaxQueuedCleanups) {
    job(*store_);
  } else {
    watcher().runInBackground(std::move(job));
  }
}

void TCPStoreBarrier::rethrowStoreFailure(const std::exception& e) const {
  throw c10::DistNetworkError(
      here(__func__, __LINE__),
      fmt::format(
          "TCPStoreBarrier rank {} of {}: {} is gone or unreachable "
          "(barrier prefix '{}', sequence {}): {}",
          rank_,
          worldSize_,
          storeAddress_,
          prefix_,
          sequence_,
          withoutBacktrace(e)));
}

void TCPStoreBarrier::close() {
  if (!store_) {
    return;
  }
  watcher_.reset();
  auto store = std::move(store_);
  if (!ownsStore_) {
    return;
  }
  // Only ranks of this library take part: torch's class never closes, so
  // waiting for it would always cost the whole timeout.
  const std::string closedKey = bookkeepingKey(kClosedSuffix);
  const std::string allClosedKey = bookkeepingKey(kAllClosedSuffix);
  try {
    if (hostsStore_ && sequence_ == 0) {
      // Before a first round, a peer may not have registered yet: give it a
      // moment (a fleet with torch's ranks never completes the count).
      try {
        store->wait(
            {bookkeepingKey(kAllMembersSuffix)},
            std::min(timeout_, kFirstRegistrationGrace));
      } catch (const c10::DistStoreError&) {
      }
    }
    const int64_t closedRanks = store->add(closedKey, 1);
    const int64_t libraryRanks =
        store->add(bookkeepingKey(kMembersSuffix), 0);
    if (closedRanks >= libraryRanks) {
      store->set(allClosedKey, kReleasedBytes);
    } else if (hostsStore_) {
      store->wait({allClosedKey}, timeout_);
    }
  } catch (const std::exception& e) {
    LOG(WARNING) << "TCPStoreBarrier rank " << rank_ << ": closing "
                 << storeAddress_ << " before every rank had closed: "
                 << withoutBacktrace(e);
  }
}

} // namespace tcpstore_barrier
