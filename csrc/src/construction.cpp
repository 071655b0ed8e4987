// Joining the store: rank 0 hosts a c10d::TCPStore server, every rank opens
// its two connections (the caller's and the worker's), announces itself
// and, with its own store, waits for the others as c10d's clients do. Also
// the error types and the accessors.
#include <tcpstore_barrier/tcpstore_barrier.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>

#include <c10/util/Logging.h>
#include <fmt/format.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "arguments.h"
#include "barrier_state.h"
#include "sockets.h"

namespace tcpstore_barrier {

using detail::BarrierState;

namespace {

// A tree level's joiners, counted under the level's key prefix.
constexpr const char* kLevelJoinedKey = "joined";

c10::SourceLocation here(const char* function, int line) {
  return {function, __FILE__, static_cast<uint32_t>(line)};
}

// Reads PrefixStore's prefix, which it keeps to itself.
struct PrefixOf : c10d::PrefixStore {
  static const std::string& of(const c10d::PrefixStore& store) {
    return store.*(&PrefixOf::prefix_);
  }
};

void checkPeerTimeout(std::optional<std::chrono::milliseconds> peerTimeout) {
  if (peerTimeout) {
    checkPositive(*peerTimeout, "peer_timeout_secs");
  }
}

// kTreeFromWorldSize, unless the environment says otherwise (for tests: a
// tree, and its fallbacks, without 1,024 ranks).
int64_t autoTreeFromWorldSize() {
  const char* text = std::getenv(kTreeFromWorldSizeVariable);
  if (text == nullptr || *text == '\0') {
    return kTreeFromWorldSize;
  }
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text, &end, 10);
  if (errno != 0 || *end != '\0' || value < 1) {
    throw std::invalid_argument(
        fmt::format(
            "{} must be a positive whole number of ranks, got '{}'",
            kTreeFromWorldSizeVariable,
            text));
  }
  return value;
}

// Whether to build a tree; throws for bad tree options, naming them.
bool wantsTree(const TreeOptions& tree, int64_t worldSize, bool tcpStore) {
  if (tree.fanIn < 2) {
    throw std::invalid_argument(
        fmt::format("tree_fan_in must be at least 2, got {}", tree.fanIn));
  }
  if (tree.host && tree.host->empty()) {
    throw std::invalid_argument("host must not be empty");
  }
  if (tree.topology == Topology::kTree && !tcpStore) {
    throw std::invalid_argument(
        "topology 'tree' needs a TCPStore (or a PrefixStore over one)");
  }
  return tcpStore && (tree.topology == Topology::kTree ||
                      (tree.topology == Topology::kAuto &&
                       worldSize >= autoTreeFromWorldSize()));
}

// On a store that outlives its barriers, a prefix is in use until the last
// rank of a barrier has closed it cleanly, which deletes everything that
// barrier left (close.cpp); before that, a second barrier could take an old
// round's release for one of its own. This rank's own alive counter is
// written by nobody else, and a round 0 cannot have released before this
// rank arrived: either present means another barrier's keys.
void refuseReusedPrefix(BarrierState& state, Clock::time_point deadline) {
  const std::vector<std::string> marks{
      state.liveness->aliveKey(state.rank), state.protocol->releaseKey(0)};
  const auto present = state.connection->checkEach(marks, deadline);
  for (std::size_t i = 0; i < marks.size(); ++i) {
    if (present[i]) {
      detail::throwPrefixInUse(state, fmt::format("'{}' exists", marks[i]));
    }
  }
}

// What every constructor does once the store is reachable: the protocol,
// the connections, this rank's first heartbeat, the worker.
void startRounds(
    BarrierState& state,
    std::optional<StoreAddress> address,
    Clock::time_point deadline) {
  state.protocol =
      state.relayRounds
          ? makeRelayProtocol(
                state.rank, state.worldSize, state.prefix, state.shape)
          : makeRoundProtocol(
                state.protocolKind,
                state.rank,
                state.worldSize,
                state.prefix,
                state.shape);
  // Deleting finished rounds goes round the ranks that arrive at this store.
  const auto arrivers = state.shape.memberRanks(state.worldSize);
  state.turns.count = static_cast<int64_t>(arrivers.size());
  state.turns.mine = std::find(arrivers.begin(), arrivers.end(), state.rank) -
                     arrivers.begin();
  if (address) {
    state.connection =
        openWireConnection(*address, deadline, state.stallLimit(), [&state] {
          state.runInterruptCheck();
        });
    state.background =
        openWireConnection(*address, deadline, state.stallLimit());
  } else {
    state.connection = openC10dConnection(state.store);
    state.background = openC10dConnection(state.store);
  }
  state.address = std::move(address);
  state.liveness = std::make_unique<Liveness>(
      state.rank,
      state.worldSize,
      state.prefix,
      state.peerTimeout,
      *state.protocol,
      state.place,
      *state.background);
  if (state.storeOutlives) {
    refuseReusedPrefix(state, deadline);
  }
  state.liveness->announce(*state.connection, deadline);
  auto* liveness = state.liveness.get();
  auto* background = state.background.get();
  auto tick = liveness->enabled() ? std::function<void()>([liveness] {
    liveness->tick();
  })
                                  : nullptr;
  const auto interrupt = [background] {
    background->abort();
  };
  if (state.place.inTree() && liveness->enabled() && state.address) {
    // A store of a tree: a verdict carried here wakes this rank at once.
    state.verdictWatch =
        openWireConnection(*state.address, deadline, state.stallLimit());
    liveness->watchVerdicts(*state.verdictWatch, deadline);
    state.worker = std::make_unique<Worker>(
        liveness->interval(),
        std::move(tick),
        interrupt,
        state.verdictWatch->pollFd(),
        [liveness] {
          return liveness->verdictSet();
        });
    return;
  }
  state.worker = std::make_unique<Worker>(
      liveness->interval(), std::move(tick), interrupt);
}

} // namespace

std::optional<StoreAddress> wireAddressOf(const c10d::Store& store) {
  // PrefixStore joins its prefix and the key with a "/".
  std::string prefixes;
  const c10d::Store* inner = &store;
  while (const auto* prefixed = dynamic_cast<const c10d::PrefixStore*>(inner)) {
    prefixes += PrefixOf::of(*prefixed) + "/";
    inner =
        const_cast<c10d::PrefixStore*>(prefixed)->getUnderlyingStore().get();
  }
  const auto* tcp = dynamic_cast<const c10d::TCPStore*>(inner);
  if (tcp == nullptr) {
    return std::nullopt;
  }
  return StoreAddress{tcp->getHost(), tcp->getPort(), "/" + prefixes};
}

BarrierTimeoutError::BarrierTimeoutError(
    std::string message,
    std::string barrierKey,
    int64_t sequence,
    std::chrono::milliseconds timeout,
    std::vector<int64_t> missingRanks)
    : c10::DistStoreError(here(__func__, __LINE__), std::move(message)),
      barrierKey_(std::move(barrierKey)),
      sequence_(sequence),
      timeout_(timeout),
      missingRanks_(std::move(missingRanks)) {}

PeerLostError::PeerLostError(
    std::string message,
    std::string barrierKey,
    int64_t sequence,
    std::chrono::milliseconds peerTimeout,
    std::vector<int64_t> missingRanks,
    std::vector<int64_t> lostRanks)
    : BarrierTimeoutError(
          std::move(message),
          std::move(barrierKey),
          sequence,
          peerTimeout,
          std::move(missingRanks)),
      lostRanks_(std::move(lostRanks)) {}

StoreUnreachableError::StoreUnreachableError(
    std::string message, int64_t sequence, std::vector<int64_t> lostRanks)
    : c10::DistNetworkError(here(__func__, __LINE__), std::move(message)),
      sequence_(sequence),
      lostRanks_(std::move(lostRanks)) {}

TCPStoreBarrier::TCPStoreBarrier(
    int64_t global_rank,
    int64_t global_world_size,
    std::string barrier_prefix,
    int64_t timeout_barrier_init_secs,
    bool use_checkpoint_barrier_tcpstore_libuv,
    uint16_t tcpstore_port,
    std::string master_address,
    int64_t timeout_secs)
    : TCPStoreBarrier(
          TCPStoreBarrierOptions{
              global_rank,
              global_world_size,
              std::move(barrier_prefix),
              checkedTimeout(
                  static_cast<double>(timeout_barrier_init_secs),
                  "timeout_barrier_init_secs"),
              use_checkpoint_barrier_tcpstore_libuv,
              tcpstore_port,
              std::move(master_address),
              checkedTimeout(
                  static_cast<double>(timeout_secs), "timeout_secs")}) {}

TCPStoreBarrier::TCPStoreBarrier(TCPStoreBarrierOptions options)
    : state_(std::make_unique<BarrierState>()) {
  BarrierState& state = *state_;
  checkRankAndWorld(options.globalRank, options.globalWorldSize);
  const uint16_t port = checkedPort(options.port);
  checkAddress(options.masterAddress);
  checkNonNegative(options.initTimeout, "timeout_barrier_init_secs");
  checkNonNegative(options.timeout, "timeout_secs");
  checkPeerTimeout(options.peerTimeout);
  const bool tree =
      wantsTree(options.tree, options.globalWorldSize, /*tcpStore=*/true);
  state.rank = options.globalRank;
  state.worldSize = options.globalWorldSize;
  state.prefix = std::move(options.barrierPrefix);
  state.timeout = options.timeout;
  state.initTimeout = options.initTimeout;
  state.peerTimeout = options.peerTimeout;
  state.protocolKind = options.protocol;
  state.ownsStore = true;
  state.hostsStore = state.rank == 0;
  state.usesLibUV = options.useLibUV;

  const auto deadline = Clock::now() + options.initTimeout;
  const auto storeAddress =
      fmt::format("the store at {}:{}", options.masterAddress, port);
  try {
    if (state.hostsStore) {
      state.store = detail::hostStore(
          options.masterAddress,
          port,
          state.worldSize,
          options.initTimeout,
          options.useLibUV);
      state.usesLibUV =
          static_cast<c10d::TCPStore&>(*state.store).isLibUvBackend();
    }
    if (tree) {
      state.address = StoreAddress{options.masterAddress, port, "/"};
      if (detail::joinTree(
              state, options.tree, /*registerAsWorker=*/true, deadline)) {
        return;
      }
    }
    startRounds(
        state, StoreAddress{options.masterAddress, port, "/"}, deadline);
    // Counted like c10d's clients, so that rank 0 (ours or torch's) stops
    // waiting for its workers.
    registerWorker(*state.connection, deadline);
    if (state.hostsStore) {
      awaitWorkers(*state.connection, state.worldSize, deadline);
    }
  } catch (const c10::DistStoreError& e) {
    throw c10::DistStoreError(
        here(__func__, __LINE__),
        fmt::format(
            "TCPStoreBarrier rank {} of {}: {} did not gather all ranks "
            "within timeout_barrier_init_secs={}: {}",
            state.rank,
            state.worldSize,
            storeAddress,
            describeSeconds(options.initTimeout),
            withoutBacktrace(e)));
  } catch (const std::invalid_argument&) {
    throw;
  } catch (const detail::TreeError&) {
    throw;
  } catch (const std::exception& e) {
    throw c10::DistNetworkError(
        here(__func__, __LINE__),
        fmt::format(
            "TCPStoreBarrier rank {} of {}: cannot reach {} within "
            "timeout_barrier_init_secs={}: {}",
            state.rank,
            state.worldSize,
            storeAddress,
            describeSeconds(options.initTimeout),
            withoutBacktrace(e)));
  }
  LOG(INFO) << "TCPStoreBarrier rank " << state.rank << " of "
            << state.worldSize << " joined " << storeAddress << " (prefix '"
            << state.prefix << "', timeout " << describeSeconds(state.timeout)
            << ", peer timeout "
            << (state.peerTimeout ? describeSeconds(*state.peerTimeout) : "off")
            << ")";
}

TCPStoreBarrier::TCPStoreBarrier(
    c10::intrusive_ptr<c10d::Store> store,
    int64_t global_rank,
    int64_t global_world_size,
    std::string barrier_prefix,
    std::chrono::milliseconds timeout,
    Protocol protocol,
    std::optional<std::chrono::milliseconds> peerTimeout,
    TreeOptions treeOptions)
    : state_(std::make_unique<BarrierState>()) {
  BarrierState& state = *state_;
  if (!store) {
    throw std::invalid_argument("store must not be null");
  }
  checkRankAndWorld(global_rank, global_world_size);
  checkNonNegative(timeout, "timeout_secs");
  checkPeerTimeout(peerTimeout);
  auto address = wireAddressOf(*store);
  if (!address && protocol == Protocol::kNative) {
    throw std::invalid_argument(
        "protocol 'native' needs a TCPStore (or a PrefixStore over one)");
  }
  const bool tree =
      wantsTree(treeOptions, global_world_size, address.has_value());
  if (auto* tcp = dynamic_cast<c10d::TCPStore*>(store.get())) {
    state.usesLibUV = tcp->isLibUvBackend();
  }
  state.rank = global_rank;
  state.worldSize = global_world_size;
  state.prefix = std::move(barrier_prefix);
  state.timeout = timeout;
  state.initTimeout = timeout;
  state.peerTimeout = peerTimeout;
  state.protocolKind = protocol;
  state.store = std::move(store);
  state.storeOutlives = true;
  try {
    if (tree) {
      state.address = address;
      if (detail::joinTree(
              state,
              treeOptions,
              /*registerAsWorker=*/false,
              Clock::now() + timeout)) {
        return;
      }
    }
    startRounds(state, std::move(address), Clock::now() + timeout);
  } catch (const StoreUnavailable& e) {
    throw c10::DistNetworkError(
        here(__func__, __LINE__),
        fmt::format(
            "TCPStoreBarrier rank {} of {}: {}",
            state.rank,
            state.worldSize,
            e.what()));
  }
}

TCPStoreBarrier::TCPStoreBarrier(std::unique_ptr<BarrierState> state)
    : state_(std::move(state)) {}

TCPStoreBarrier::~TCPStoreBarrier() {
  detail::destroyBarrier(*state_);
}

namespace detail {

void throwPrefixInUse(const BarrierState& state, const std::string& evidence) {
  throw c10::DistStoreError(
      here(__func__, __LINE__),
      fmt::format(
          "TCPStoreBarrier rank {}: barrier_prefix '{}' is in use on this "
          "store ({}): another barrier with this prefix is open, or ended "
          "without every rank closing it cleanly; close() every rank's "
          "barrier first, or use another barrier_prefix",
          state.rank,
          state.prefix,
          evidence));
}

c10::intrusive_ptr<c10d::Store> hostStore(
    const std::string& address,
    uint16_t port,
    int64_t workers,
    std::chrono::milliseconds timeout,
    bool useLibUV) {
  // TCPStore's own server listens on every interface; binding the socket
  // here keeps it on the one interface peers use to reach this host.
  auto listener = openListenSocket(address, port);
  c10d::TCPStoreOptions serverOptions;
  serverOptions.port = port == 0 ? localPort(listener.get()) : port;
  serverOptions.isServer = true;
  serverOptions.numWorkers = static_cast<std::size_t>(workers);
  // Waited for by the caller, to the millisecond.
  serverOptions.waitWorkers = false;
  serverOptions.timeout = timeout;
  serverOptions.useLibUV = useLibUV;
  serverOptions.masterListenFd = listener.release();
  return c10::make_intrusive<c10d::TCPStore>(address, serverOptions);
}

TreeStoreHost hostTreeStore(
    const std::string& tree,
    const std::string& address,
    bool useLibUV,
    std::chrono::milliseconds timeout) {
  // One server per tree, process and address: c10d's TCPStore connects a
  // client of its own to every server it starts, which resolves the
  // server's name; where reverse lookups are slow (containers) that costs
  // seconds a store, and a leader may host several levels (a test many
  // hosts' worth). The registry holds no reference to a server (c10d does
  // not stop a TCPStore while even a weak one exists): the levels' shares
  // keep it running, and it stops with the last of them.
  struct SharedServer {
    c10::intrusive_ptr<c10d::Store> store;
  };
  static std::mutex mutex;
  using ServerKey = std::tuple<std::string, std::string, bool>;
  static std::map<ServerKey, std::weak_ptr<SharedServer>> servers;
  static int64_t levels = 0;
  std::lock_guard<std::mutex> lock(mutex);
  for (auto it = servers.begin(); it != servers.end();) {
    it = it->second.expired() ? servers.erase(it) : std::next(it);
  }
  const auto key = std::make_tuple(tree, address, useLibUV);
  std::shared_ptr<SharedServer> server;
  if (auto found = servers.find(key); found != servers.end()) {
    server = found->second.lock();
  }
  if (!server) {
    server = std::make_shared<SharedServer>(
        SharedServer{hostStore(address, 0, 1, timeout, useLibUV)});
    servers.insert_or_assign(key, server);
  }
  const auto port = static_cast<c10d::TCPStore&>(*server->store).getPort();
  return {
      server->store,
      server,
      StoreAddress{
          address,
          static_cast<uint16_t>(port),
          fmt::format("/tree{}/", ++levels)}};
}

std::unique_ptr<TCPStoreBarrier> openLevel(
    LevelSpec spec, Clock::time_point deadline) {
  auto owned = std::make_unique<BarrierState>();
  BarrierState& state = *owned;
  state.rank = spec.rank;
  state.worldSize = spec.worldSize;
  state.prefix = std::move(spec.prefix);
  state.timeout = spec.timeout;
  state.initTimeout = spec.timeout;
  state.peerTimeout = spec.peerTimeout;
  state.protocolKind = spec.protocol;
  state.relayRounds = spec.relayRounds;
  state.shape = std::move(spec.shape);
  state.place = std::move(spec.place);
  state.ownsStore = true;
  state.hostsStore = static_cast<bool>(spec.server);
  state.usesLibUV = spec.usesLibUV;
  state.store = std::move(spec.server);
  state.treeServer = std::move(spec.serverShare);
  state.storeOutlives = spec.storeOutlives;
  auto barrier = BarrierAccess::make(std::move(owned));
  try {
    startRounds(state, spec.address, deadline);
  } catch (...) {
    // Half open (a member that could not reach its store): nothing to say
    // goodbye on.
    state.phase = detail::Phase::kClosed;
    throw;
  }
  if (spec.awaitMembers) {
    state.connection->add(kLevelJoinedKey, 1, deadline);
    if (state.hostsStore) {
      awaitCount(*state.connection, kLevelJoinedKey, state.worldSize, deadline);
    }
  }
  return barrier;
}

std::unique_ptr<TCPStoreBarrier> BarrierAccess::make(
    std::unique_ptr<BarrierState> state) {
  return std::unique_ptr<TCPStoreBarrier>(
      new TCPStoreBarrier(std::move(state)));
}

} // namespace detail

int64_t TCPStoreBarrier::sequence() const noexcept {
  return state_->tree ? state_->tree->sequence() : state_->sequence;
}
bool TCPStoreBarrier::usesLibUV() const noexcept {
  return state_->usesLibUV;
}
int64_t TCPStoreBarrier::rank() const noexcept {
  return state_->rank;
}
int64_t TCPStoreBarrier::worldSize() const noexcept {
  return state_->worldSize;
}
const std::string& TCPStoreBarrier::barrierPrefix() const noexcept {
  return state_->prefix;
}
std::chrono::milliseconds TCPStoreBarrier::timeout() const noexcept {
  return state_->timeout;
}
std::optional<std::chrono::milliseconds> TCPStoreBarrier::peerTimeout()
    const noexcept {
  return state_->peerTimeout;
}
Protocol TCPStoreBarrier::protocol() const noexcept {
  return state_->protocolKind;
}
Topology TCPStoreBarrier::topology() const noexcept {
  return state_->tree ? Topology::kTree : Topology::kFlat;
}
int64_t TCPStoreBarrier::treeLevels() const noexcept {
  return state_->tree ? state_->tree->levels() : 1;
}
bool TCPStoreBarrier::closed() const noexcept {
  return state_->phase == detail::Phase::kClosed;
}

c10::intrusive_ptr<c10d::Store> TCPStoreBarrier::store() {
  BarrierState& state = *state_;
  if (!state.store && state.address && state.phase != detail::Phase::kClosed) {
    c10d::TCPStoreOptions clientOptions;
    clientOptions.port = state.address->port;
    clientOptions.isServer = false;
    clientOptions.waitWorkers = false;
    clientOptions.timeout = state.initTimeout;
    clientOptions.useLibUV = state.usesLibUV;
    state.store =
        c10::make_intrusive<c10d::TCPStore>(state.address->host, clientOptions);
  }
  return state.store;
}

void TCPStoreBarrier::setInterruptCheck(std::function<void()> check) {
  if (state_->tree) {
    state_->tree->setInterruptCheck(check);
  }
  state_->interruptCheck = std::move(check);
}

void TCPStoreBarrier::close() {
  detail::closeBarrier(*state_, Clock::now() + state_->timeout);
}

} // namespace tcpstore_barrier
