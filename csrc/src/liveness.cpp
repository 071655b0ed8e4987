#include "liveness.h"

#include <algorithm>
#include <utility>

namespace tcpstore_barrier {
namespace {

// A heartbeat that arrives alone costs the store's one server thread 20-30
// us (it wakes up for it): at this rate heartbeats take under 1% of it,
// however many ranks there are (see docs/liveness.md).
constexpr int64_t kHeartbeatsPerSecond = 300;
// A live rank beats at least twice within the silence allowed.
constexpr double kBeatsPerSilence = 2.5;
// Added to every member's counter once a loss is declared, so that each
// rank learns of it from its next heartbeat's reply, with no request of its
// own while it waits.
constexpr int64_t kAlarmOffset = int64_t{1} << 40;

constexpr std::string_view kAliveInfix = "/alive/";
constexpr std::string_view kClosedInfix = "/closed/";
constexpr std::string_view kLostSuffix = "/lost";
constexpr std::string_view kLostField = "lost=";
constexpr std::string_view kMissingField = "missing=";
constexpr std::string_view kDecidedField = "decided";
constexpr std::string_view kRootLostField = "root-lost";

} // namespace

std::string lostKeyOf(const std::string& prefix) {
  return prefix + std::string(kLostSuffix);
}

std::string closedKey(const std::string& prefix, int64_t rank) {
  std::string key = prefix;
  key.append(kClosedInfix);
  appendDecimal(key, rank);
  return key;
}

std::string joinRanks(const std::vector<int64_t>& ranks) {
  std::string text;
  for (const int64_t rank : ranks) {
    if (!text.empty()) {
      text.push_back(',');
    }
    appendDecimal(text, rank);
  }
  return text;
}

std::vector<int64_t> splitRanks(std::string_view text) {
  std::vector<int64_t> ranks;
  while (!text.empty()) {
    const auto comma = text.find(',');
    if (auto rank = parseDecimal(text.substr(0, comma))) {
      ranks.push_back(*rank);
    }
    text = comma == std::string_view::npos ? "" : text.substr(comma + 1);
  }
  return ranks;
}

Clock::duration SilenceTracker::stillFor(
    int64_t rank, const std::string& value, Clock::time_point now) {
  auto [entry, first] = seen_.try_emplace(rank, Seen{value, now});
  if (first || entry->second.value != value) {
    entry->second = Seen{value, now};
    return Clock::duration::zero();
  }
  return now - entry->second.since;
}

Alarm peersLostVerdict(
    std::vector<int64_t> lost, std::vector<int64_t> missing, bool decided) {
  return Alarm{
      Alarm::Kind::kPeersLost,
      std::move(lost),
      std::move(missing),
      {},
      decided};
}

Alarm rootLostVerdict() {
  return Alarm{
      Alarm::Kind::kStoreGone, {}, {}, "the tree's root store is lost", true};
}

std::string encodeVerdict(const Alarm& verdict) {
  std::string text(kLostField);
  text.append(joinRanks(verdict.lostRanks)).append(";").append(kMissingField);
  text.append(joinRanks(verdict.missingRanks));
  if (verdict.decided) {
    text.append(";").append(kDecidedField);
  }
  if (verdict.kind != Alarm::Kind::kPeersLost) {
    text.append(";").append(kRootLostField);
  }
  return text;
}

Alarm decodeVerdict(std::string_view text) {
  Alarm verdict = peersLostVerdict({}, {}, false);
  while (!text.empty()) {
    const auto end = text.find(';');
    const auto field = text.substr(0, end);
    if (field.substr(0, kLostField.size()) == kLostField) {
      verdict.lostRanks = splitRanks(field.substr(kLostField.size()));
    } else if (field.substr(0, kMissingField.size()) == kMissingField) {
      verdict.missingRanks = splitRanks(field.substr(kMissingField.size()));
    } else if (field == kDecidedField) {
      verdict.decided = true;
    } else if (field == kRootLostField) {
      verdict = rootLostVerdict();
    }
    text = end == std::string_view::npos ? "" : text.substr(end + 1);
  }
  return verdict;
}

Alarm declareVerdict(
    StoreConnection& connection,
    const std::string& prefix,
    const std::vector<int64_t>& members,
    const Alarm& verdict,
    Clock::time_point deadline) {
  // The first declaration stands, so that every rank names the same ranks.
  auto standing = connection.compareSet(
      lostKeyOf(prefix), "", encodeVerdict(verdict), deadline);
  std::vector<std::string> keys;
  for (const int64_t rank : members) {
    std::string key = prefix;
    key.append(kAliveInfix);
    appendDecimal(key, rank);
    keys.push_back(std::move(key));
  }
  connection.addEach(keys, kAlarmOffset, deadline);
  return decodeVerdict(standing);
}

LivenessTiming::LivenessTiming(
    std::optional<std::chrono::milliseconds> peerTimeout, int64_t worldSize) {
  if (peerTimeout) {
    const auto fair =
        std::chrono::milliseconds(worldSize * 1000 / kHeartbeatsPerSecond);
    interval = std::max(*peerTimeout / 5, fair);
    silenceLimit = std::max(
        *peerTimeout,
        std::chrono::duration_cast<std::chrono::milliseconds>(
            interval * kBeatsPerSilence));
  }
}

std::vector<int64_t> TreePlace::globalRanks(
    const std::vector<int64_t>& ranks) const {
  std::vector<int64_t> global;
  for (const int64_t rank : ranks) {
    const auto named = subtrees.find(rank);
    if (named == subtrees.end()) {
      global.push_back(rank);
    } else {
      global.insert(global.end(), named->second.begin(), named->second.end());
    }
  }
  std::sort(global.begin(), global.end());
  global.erase(std::unique(global.begin(), global.end()), global.end());
  return global;
}

Liveness::Liveness(
    int64_t rank,
    int64_t worldSize,
    const std::string& prefix,
    std::optional<std::chrono::milliseconds> peerTimeout,
    const RoundProtocol& protocol,
    TreePlace place,
    StoreConnection& connection)
    : rank_(rank),
      worldSize_(worldSize),
      prefix_(prefix),
      enabled_(peerTimeout.has_value()),
      timing_(
          peerTimeout,
          static_cast<int64_t>(protocol.shape().memberRanks(worldSize).size())),
      protocol_(protocol),
      place_(std::move(place)),
      connection_(connection),
      ownAliveKey_(aliveKey(rank)),
      alarmFd_(makeEventFd()),
      silence_(timing_.silenceLimit) {}

std::string Liveness::aliveKey(int64_t rank) const {
  std::string key = prefix_;
  key.append(kAliveInfix);
  appendDecimal(key, rank);
  return key;
}

void Liveness::announce(
    StoreConnection& connection, Clock::time_point deadline) {
  connection.add(ownAliveKey_, 1, deadline);
}

void Liveness::enterRound(int64_t sequence, bool watcher) {
  std::lock_guard<std::mutex> lock(mutex_);
  round_ = Round{true, watcher, sequence, Clock::now()};
}

void Liveness::leaveRound() {
  std::lock_guard<std::mutex> lock(mutex_);
  round_.waiting = false;
}

std::optional<Alarm> Liveness::alarm() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return alarm_;
}

void Liveness::alsoPost(int fd) {
  alsoPostFd_ = fd;
  if (alarm()) {
    postEvent(fd);
  }
}

void Liveness::raise(Alarm alarm) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (alarm_) {
      return;
    }
    alarm_ = std::move(alarm);
  }
  postEvent(alarmFd_.get());
  if (const int also = alsoPostFd_; also >= 0) {
    postEvent(also);
  }
}

void Liveness::tick() {
  Round round;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (alarm_) {
      return;
    }
    round = round_;
  }
  const auto now = Clock::now();
  const auto deadline = now + timing_.silenceLimit;
  try {
    if (connection_.add(ownAliveKey_, 1, deadline) >= kAlarmOffset) {
      readDeclaredLoss(deadline);
    } else if (
        round.waiting && round.watcher &&
        now - round.since >= timing_.interval) {
      watch(round, deadline);
    }
  } catch (const StoreUnavailable& e) {
    raise(
        Alarm{
            e.silent() ? Alarm::Kind::kStoreSilent : Alarm::Kind::kStoreGone,
            {},
            {},
            e.what()});
  }
}

void Liveness::watchVerdicts(
    StoreConnection& watch, Clock::time_point deadline) {
  verdictWatch_ = &watch;
  watch.startWait(lostKeyOf(prefix_), deadline);
}

bool Liveness::verdictSet() {
  const auto deadline = Clock::now() + timing_.silenceLimit;
  try {
    if (!verdictWatch_->awaitRelease(Clock::now(), -1)) {
      return true;
    }
    readDeclaredLoss(deadline);
  } catch (const StoreUnavailable& e) {
    // The store's host is gone: as a heartbeat would find, only sooner.
    raise(
        Alarm{
            e.silent() ? Alarm::Kind::kStoreSilent : Alarm::Kind::kStoreGone,
            {},
            {},
            e.what()});
  }
  return false;
}

void Liveness::readDeclaredLoss(Clock::time_point deadline) {
  const std::vector<std::string> key{lostKeyOf(prefix_)};
  if (!connection_.check(key, deadline)) {
    return;
  }
  auto alarm = decodeVerdict(connection_.multiGet(key, deadline).front());
  alarm.decided = alarm.decided || place_.decides;
  raise(std::move(alarm));
  // The host, itself about to raise this verdict and perhaps to exit,
  // keeps the store up until every survivor has it (close.cpp).
  connection_.set(closedKey(prefix_, rank_), "1");
  connection_.flush(deadline);
}

void Liveness::watch(const Round& round, Clock::time_point deadline) {
  if (round.sequence != seenSequence_) {
    silence_.clear();
    seenSequence_ = round.sequence;
  }
  const auto missing =
      protocol_.missingRanks(connection_, rankKeys_, round.sequence, deadline);
  // torch's ranks send no heartbeat: only ranks with a counter are watched.
  // A rank still constructing may get one later, so look again each time.
  std::vector<int64_t> unknown;
  for (const int64_t rank : missing) {
    if (members_.count(rank) == 0 && rank != rank_) {
      unknown.push_back(rank);
    }
  }
  learnMembers(unknown, deadline);
  std::vector<std::string> keys;
  std::vector<int64_t> watched;
  for (const int64_t rank : missing) {
    if (members_.count(rank) != 0) {
      keys.push_back(aliveKey(rank));
      watched.push_back(rank);
    }
  }
  if (watched.empty()) {
    return;
  }
  const auto values = connection_.multiGet(keys, deadline);
  const auto now = Clock::now();
  std::vector<int64_t> lost;
  // Ranks that die together stop up to an interval apart, and this watcher
  // may see one go still a watch before another: a declaration, final once
  // made, also names those still for all but the last interval and a half
  // of the limit (and at least two beats), so one death does not hide the
  // next.
  const auto companionLimit = std::max<Clock::duration>(
      timing_.silenceLimit - timing_.interval * 3 / 2, timing_.interval * 2);
  std::vector<int64_t> companions;
  for (std::size_t i = 0; i < watched.size(); ++i) {
    const auto still = silence_.stillFor(watched[i], values[i], now);
    if (still >= timing_.silenceLimit) {
      lost.push_back(watched[i]);
    } else if (still >= companionLimit) {
      companions.push_back(watched[i]);
    }
  }
  if (!lost.empty()) {
    lost.insert(lost.end(), companions.begin(), companions.end());
    std::sort(lost.begin(), lost.end());
    declareLoss(lost, missing, deadline);
    readDeclaredLoss(deadline);
  }
}

void Liveness::learnMembers(
    const std::vector<int64_t>& ranks, Clock::time_point deadline) {
  std::vector<std::string> keys;
  for (const int64_t rank : ranks) {
    keys.push_back(aliveKey(rank));
  }
  if (keys.empty()) {
    return;
  }
  const auto exists = connection_.checkEach(keys, deadline);
  for (std::size_t i = 0; i < exists.size(); ++i) {
    if (exists[i]) {
      members_.insert(ranks[i]);
    }
  }
}

void Liveness::declareLoss(
    const std::vector<int64_t>& lost,
    const std::vector<int64_t>& missing,
    Clock::time_point deadline) {
  // In global ranks: in a tree, a rank at this store stands for its
  // subtree, and the verdict travels to stores that number ranks otherwise.
  const auto& shape = protocol_.shape();
  learnMembers(shape.memberRanks(worldSize_), deadline);
  declareVerdict(
      connection_,
      prefix_,
      std::vector<int64_t>(members_.begin(), members_.end()),
      peersLostVerdict(
          place_.globalRanks(lost),
          place_.globalRanks(missing),
          place_.decides),
      deadline);
}

} // namespace tcpstore_barrier
