// TCPStore's wire protocol on a socket we own, with a deadline on every call.
//
// A request is a QueryType byte and its arguments (strings and byte values
// as a native uint64 length then the bytes, numbers in native order); the
// server answers requests in the order they come. Owning the socket is what
// gives us reply deadlines, interruptible waits, no c10d warning per timed
// out wait slice, and requests written together in one send.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <utility>

#include <fmt/format.h>

#include "sockets.h"
#include "store_connection.h"
#include "torch_compat.h"

namespace tcpstore_barrier {
namespace {

using c10d::detail::CheckResponseType;
using c10d::detail::QueryType;
using c10d::detail::WaitResponseType;

// c10d's client counts itself in this key, without its "/" key prefix.
constexpr std::string_view kWorkerCountKey = "init/";
// How often the host looks at the count while it waits for its workers.
constexpr std::chrono::milliseconds kWorkerPoll{10};
constexpr std::chrono::milliseconds kWorkerPollReply{500};

int millisUntil(Clock::time_point until) {
  const auto left =
      std::chrono::ceil<std::chrono::milliseconds>(until - Clock::now());
  return static_cast<int>(std::clamp<int64_t>(left.count(), 0, 1 << 30));
}

class WireConnection final : public StoreConnection {
 public:
  WireConnection(
      UniqueFd fd, StoreAddress address, std::function<void()> interruptCheck)
      : fd_(std::move(fd)),
        address_(std::move(address)),
        description_(
            fmt::format("the store at {}:{}", address_.host, address_.port)),
        interruptCheck_(std::move(interruptCheck)) {}

  void set(std::string_view key, std::string_view value) override {
    begin(QueryType::SET);
    appendKey(key);
    appendString(value);
  }

  void flush(Clock::time_point deadline) override {
    sendPending(deadline);
  }

  void sendAdd(std::string_view key, int64_t delta, Clock::time_point deadline)
      override {
    startCall();
    beginWithReply(QueryType::ADD);
    appendKey(key);
    appendValue(delta);
    sendPending(deadline);
  }

  void addEach(
      const std::vector<std::string>& keys,
      int64_t delta,
      Clock::time_point deadline) override {
    startCall();
    for (const auto& key : keys) {
      beginWithReply(QueryType::ADD);
      appendKey(key);
      appendValue(delta);
    }
    readEach<int64_t>(
        keys.size(),
        [&] {
          return readValue<int64_t>(deadline);
        },
        deadline);
  }

  bool replyReady(Clock::time_point until) override {
    while (received_.size() == consumed_) {
      pollfd pfd{fd_.get(), POLLIN, 0};
      const int ready = ::poll(&pfd, 1, millisUntil(until));
      if (ready == 0) {
        return false;
      }
      if (ready > 0) {
        receiveSome();
      }
    }
    return true;
  }

  int64_t readAdd(Clock::time_point deadline) override {
    return readReply([&] {
      return readValue<int64_t>(deadline);
    });
  }

  bool check(const std::vector<std::string>& keys, Clock::time_point deadline)
      override {
    startCall();
    beginWithReply(QueryType::CHECK);
    appendKeys(keys);
    sendPending(deadline);
    return readReply([&] {
      return readValue<CheckResponseType>(deadline) == CheckResponseType::READY;
    });
  }

  std::vector<bool> checkEach(
      const std::vector<std::string>& keys,
      Clock::time_point deadline) override {
    startCall();
    for (const auto& key : keys) {
      beginWithReply(QueryType::CHECK);
      appendValue<uint64_t>(1);
      appendKey(key);
    }
    return readEach<bool>(
        keys.size(),
        [&] {
          return readValue<CheckResponseType>(deadline) ==
                 CheckResponseType::READY;
        },
        deadline);
  }

  std::vector<std::string> multiGet(
      const std::vector<std::string>& keys,
      Clock::time_point deadline) override {
    startCall();
    beginWithReply(QueryType::MULTI_GET);
    appendKeys(keys);
    sendPending(deadline);
    return readReply([&] {
      std::vector<std::string> values(keys.size());
      for (auto& value : values) {
        value = readString(deadline);
      }
      return values;
    });
  }

  std::vector<bool> deleteEach(
      const std::vector<std::string>& keys,
      Clock::time_point deadline) override {
    startCall();
    for (const auto& key : keys) {
      beginWithReply(QueryType::DELETE_KEY);
      appendKey(key);
    }
    return readEach<bool>(
        keys.size(),
        [&] {
          return readValue<int64_t>(deadline) > 0;
        },
        deadline);
  }

  std::string compareSet(
      std::string_view key,
      std::string_view expected,
      std::string_view desired,
      Clock::time_point deadline) override {
    startCall();
    beginWithReply(QueryType::COMPARE_SET);
    appendKey(key);
    appendString(expected);
    appendString(desired);
    sendPending(deadline);
    return readReply([&] {
      return readString(deadline);
    });
  }

  void startWait(std::string_view key, Clock::time_point deadline) override {
    startCall();
    beginWithReply(QueryType::WAIT);
    appendValue<uint64_t>(1);
    appendKey(key);
    sendPending(deadline);
  }

  void startWaitAll(
      const std::vector<std::string>& keys,
      Clock::time_point deadline) override {
    startCall();
    beginWithReply(QueryType::WAIT);
    appendValue<uint64_t>(keys.size());
    for (const auto& key : keys) {
      appendKey(key);
    }
    sendPending(deadline);
  }

  void startServerBarrier(
      std::string_view key,
      int64_t worldSize,
      Clock::time_point deadline) override {
    startCall();
    beginWithReply(QueryType::BARRIER);
    appendKey(key);
    appendValue(worldSize);
    sendPending(deadline);
  }

  bool awaitRelease(Clock::time_point until, int alarmFd) override {
    for (;;) {
      if (received_.size() > consumed_) {
        const auto reply = readReply([&] {
          return readValue<WaitResponseType>(until);
        });
        if (reply != WaitResponseType::STOP_WAITING) {
          fail("answered a wait with an unexpected reply", false);
        }
        return true;
      }
      pollfd fds[2] = {{fd_.get(), POLLIN, 0}, {alarmFd, POLLIN, 0}};
      const int ready = ::poll(fds, alarmFd >= 0 ? 2 : 1, millisUntil(until));
      if (ready < 0 && errno != EINTR) {
        fail(std::strerror(errno), false);
      }
      if (alarmFd >= 0 && (fds[1].revents & POLLIN) != 0) {
        return false;
      }
      if (ready > 0 && fds[0].revents != 0) {
        receiveSome();
      } else if (Clock::now() >= until) {
        return false;
      }
    }
  }

  bool idle() const noexcept override {
    return repliesDue_ == 0 && pending_.empty();
  }

  void abort() noexcept override {
    ::shutdown(fd_.get(), SHUT_RDWR);
  }

  const std::string& describe() const override {
    return description_;
  }

  int pollFd() const noexcept override {
    return fd_.get();
  }

  std::string localAddress() const override {
    return tcpstore_barrier::localAddress(fd_.get());
  }
  std::string peerAddress() const override {
    return tcpstore_barrier::peerAddress(fd_.get());
  }

  // c10d's handshake: the magic number, then a ping that proves the server
  // answers.
  void validate(Clock::time_point deadline) {
    begin(QueryType::VALIDATE);
    appendValue(c10d::detail::validationMagicNumber);
    const uint32_t nonce = static_cast<uint32_t>(::getpid());
    beginWithReply(QueryType::PING);
    appendValue(nonce);
    sendPending(deadline);
    const auto echoed = readReply([&] {
      return readValue<uint32_t>(deadline);
    });
    if (echoed != nonce) {
      fail("answered the handshake with a wrong nonce", false);
    }
  }

  // Adds `delta` to the worker count; its value then.
  int64_t countWorkers(int64_t delta, Clock::time_point deadline) {
    startCall();
    beginWithReply(QueryType::ADD);
    appendString(kWorkerCountKey);
    appendValue<int64_t>(delta);
    sendPending(deadline);
    return readReply([&] {
      return readValue<int64_t>(deadline);
    });
  }

 private:
  void begin(QueryType query) {
    if (!failure_.empty()) {
      throw StoreUnavailable(failure_, failureSilent_);
    }
    pending_.push_back(static_cast<char>(query));
  }

  // A request with a reply. Replies come in request order and carry no
  // tag: one still due from a call cut short (an interrupt, a deadline)
  // would be read as this request's, so only the split calls (an arrival,
  // a wait) may leave one due, and they alone may send behind it.
  void beginWithReply(QueryType query) {
    begin(query);
    ++repliesDue_;
  }

  // Where a call with replies starts: none may be due from an earlier one.
  void startCall() const {
    if (repliesDue_ != 0) {
      throw std::logic_error(
          fmt::format(
              "tcpstore_barrier: a request to {} would read a reply due to an "
              "earlier one",
              description_));
    }
  }

  template <typename T>
  void appendValue(T value) {
    pending_.append(reinterpret_cast<const char*>(&value), sizeof(T));
  }

  void appendString(std::string_view bytes) {
    appendValue<uint64_t>(bytes.size());
    pending_.append(bytes);
  }

  void appendKey(std::string_view key) {
    appendValue<uint64_t>(address_.keyPrefix.size() + key.size());
    pending_.append(address_.keyPrefix);
    pending_.append(key);
  }

  // Sends the requests queued, one per key, then reads their replies.
  template <typename Reply, typename Read>
  std::vector<Reply> readEach(
      std::size_t count, Read read, Clock::time_point deadline) {
    sendPending(deadline);
    std::vector<Reply> replies;
    replies.reserve(count);
    for (std::size_t i = 0; i < count; ++i) {
      replies.push_back(readReply(read));
    }
    return replies;
  }

  // Reads one reply in full: it is then no longer due.
  template <typename Read>
  auto readReply(Read read) -> decltype(read()) {
    auto reply = read();
    --repliesDue_;
    return reply;
  }

  void appendKeys(const std::vector<std::string>& keys) {
    appendValue<uint64_t>(keys.size());
    for (const auto& key : keys) {
      appendKey(key);
    }
  }

  [[noreturn]] void fail(const std::string& why, bool silent) {
    failure_ = fmt::format("{} {}", description_, why);
    failureSilent_ = silent;
    throw StoreUnavailable(failure_, silent);
  }

  // Blocks until `events` on the socket, or fails as silent at `deadline`,
  // running the interrupt check between slices.
  void awaitSocket(short events, Clock::time_point deadline) {
    for (;;) {
      const auto now = Clock::now();
      if (now >= deadline) {
        fail(
            events == POLLOUT ? "stopped taking requests before the deadline"
                              : "stopped answering before the deadline",
            true);
      }
      auto until = deadline;
      if (interruptCheck_) {
        until = std::min(until, now + kInterruptSlice);
      }
      pollfd pfd{fd_.get(), events, 0};
      const int ready = ::poll(&pfd, 1, millisUntil(until));
      if (ready > 0) {
        return;
      }
      if (ready < 0 && errno != EINTR) {
        fail(std::strerror(errno), false);
      }
      if (interruptCheck_ && Clock::now() < deadline) {
        interruptCheck_();
      }
    }
  }

  void sendPending(Clock::time_point deadline) {
    std::size_t sent = 0;
    while (sent < pending_.size()) {
      const ssize_t n = ::send(
          fd_.get(),
          pending_.data() + sent,
          pending_.size() - sent,
          MSG_NOSIGNAL);
      if (n >= 0) {
        sent += static_cast<std::size_t>(n);
      } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
        awaitSocket(POLLOUT, deadline);
      } else if (errno != EINTR) {
        fail(fmt::format("is gone ({})", std::strerror(errno)), false);
      }
    }
    pending_.clear();
  }

  void receiveSome() {
    if (consumed_ == received_.size()) {
      received_.clear();
      consumed_ = 0;
    }
    char chunk[4096];
    const ssize_t n = ::recv(fd_.get(), chunk, sizeof(chunk), 0);
    if (n > 0) {
      received_.append(chunk, static_cast<std::size_t>(n));
    } else if (n == 0) {
      fail("is gone (it closed the connection)", false);
    } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      fail(fmt::format("is gone ({})", std::strerror(errno)), false);
    }
  }

  void readExact(char* out, std::size_t size, Clock::time_point deadline) {
    while (received_.size() - consumed_ < size) {
      awaitSocket(POLLIN, deadline);
      receiveSome();
    }
    std::memcpy(out, received_.data() + consumed_, size);
    consumed_ += size;
  }

  template <typename T>
  T readValue(Clock::time_point deadline) {
    T value;
    readExact(reinterpret_cast<char*>(&value), sizeof(T), deadline);
    return value;
  }

  std::string readString(Clock::time_point deadline) {
    const auto size = readValue<uint64_t>(deadline);
    std::string bytes(size, '\0');
    readExact(bytes.data(), size, deadline);
    return bytes;
  }

  UniqueFd fd_;
  StoreAddress address_;
  std::string description_;
  std::function<void()> interruptCheck_;
  std::string pending_;
  std::string received_;
  std::size_t consumed_ = 0;
  // Requests sent whose reply has not been read in full.
  int64_t repliesDue_ = 0;
  std::string failure_;
  bool failureSilent_ = false;
};

} // namespace

std::unique_ptr<StoreConnection> openWireConnection(
    const StoreAddress& address,
    Clock::time_point deadline,
    std::chrono::milliseconds stallLimit,
    std::function<void()> interruptCheck,
    Refused refused) {
  UniqueFd fd = connectSocket(
      address.host, address.port, deadline, address.otherHosts, refused);
  tuneStoreSocket(fd.get(), stallLimit);
  auto connection = std::make_unique<WireConnection>(
      std::move(fd), address, std::move(interruptCheck));
  connection->validate(deadline);
  return connection;
}

void registerWorker(StoreConnection& connection, Clock::time_point deadline) {
  dynamic_cast<WireConnection&>(connection).countWorkers(1, deadline);
}

void awaitWorkers(
    StoreConnection& connection,
    int64_t worldSize,
    Clock::time_point deadline) {
  auto& wire = dynamic_cast<WireConnection&>(connection);
  for (;;) {
    // The last look, at the deadline, still gets its answer.
    const int64_t joined = wire.countWorkers(
        0, std::max(deadline, Clock::now() + kWorkerPollReply));
    if (joined >= worldSize) {
      return;
    }
    if (Clock::now() >= deadline) {
      throw c10::DistStoreError(
          {__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
          fmt::format(
              "{} of {} ranks had joined {}",
              joined,
              worldSize,
              connection.describe()));
    }
    std::this_thread::sleep_for(
        std::min<Clock::duration>(kWorkerPoll, deadline - Clock::now()));
  }
}

void awaitCount(
    StoreConnection& connection,
    const std::string& key,
    int64_t count,
    Clock::time_point deadline) {
  for (;;) {
    const int64_t joined = connection.add(
        key, 0, std::max(deadline, Clock::now() + kWorkerPollReply));
    if (joined >= count) {
      return;
    }
    if (Clock::now() >= deadline) {
      throw c10::DistStoreError(
          {__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
          fmt::format(
              "{} of {} ranks had joined {}",
              joined,
              count,
              connection.describe()));
    }
    std::this_thread::sleep_for(
        std::min<Clock::duration>(kWorkerPoll, deadline - Clock::now()));
  }
}

} // namespace tcpstore_barrier
