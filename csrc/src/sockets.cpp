#include "sockets.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <thread>

#include <c10/util/Exception.h>
#include <fmt/format.h>

namespace tcpstore_barrier {
namespace {

struct AddrInfoDeleter {
  void operator()(addrinfo* info) const noexcept {
    freeaddrinfo(info);
  }
};

[[noreturn]] void throwNetworkError(const std::string& message) {
  throw c10::DistNetworkError(
      {__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, message);
}

using AddrInfoPtr = std::unique_ptr<addrinfo, AddrInfoDeleter>;

// Resolves `host`; nullptr while the resolver reports a temporary failure.
AddrInfoPtr resolve(const std::string& host, uint16_t port, int flags) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | flags;
  addrinfo* found = nullptr;
  const std::string service = std::to_string(port);
  const int rc = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &found);
  if (rc == EAI_AGAIN) {
    return nullptr;
  }
  if (rc != 0) {
    throwNetworkError(
        fmt::format(
            "master_address '{}' does not resolve: {}",
            host,
            gai_strerror(rc)));
  }
  return AddrInfoPtr(found);
}

// One non-blocking connect attempt, bounded by `timeout`: the socket on
// success, else why it failed.
UniqueFd tryConnect(
    const addrinfo& a, std::chrono::milliseconds timeout, std::string& error) {
  UniqueFd fd(
      ::socket(a.ai_family, a.ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (fd.get() < 0) {
    error = std::strerror(errno);
    return UniqueFd();
  }
  if (::connect(fd.get(), a.ai_addr, a.ai_addrlen) == 0) {
    return fd;
  }
  if (errno != EINPROGRESS) {
    error = std::strerror(errno);
    return UniqueFd();
  }
  pollfd pfd{fd.get(), POLLOUT, 0};
  const int ready = ::poll(&pfd, 1, static_cast<int>(timeout.count()));
  if (ready <= 0) {
    error = ready == 0 ? "connection timed out" : std::strerror(errno);
    return UniqueFd();
  }
  int soError = 0;
  socklen_t length = sizeof(soError);
  ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &soError, &length);
  if (soError != 0) {
    error = std::strerror(soError);
    return UniqueFd();
  }
  return fd;
}

} // namespace

UniqueFd::~UniqueFd() {
  if (fd_ >= 0) {
    ::close(fd_);
  }
}

UniqueFd& UniqueFd::operator=(UniqueFd&& other) noexcept {
  if (this != &other) {
    UniqueFd old(fd_);
    fd_ = other.release();
  }
  return *this;
}

UniqueFd openListenSocket(const std::string& host, uint16_t port) {
  AddrInfoPtr addresses = resolve(host, port, AI_ADDRCONFIG);
  if (!addresses) {
    throwNetworkError(
        fmt::format(
            "master_address '{}' does not resolve: the name server is not "
            "answering",
            host));
  }

  // Peers connect to the first address the name resolves to, so bind that
  // one; the next is only a fallback when this host cannot use it.
  std::string lastError;
  for (addrinfo* a = addresses.get(); a != nullptr; a = a->ai_next) {
    UniqueFd fd(::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, 0));
    if (fd.get() < 0) {
      lastError = std::strerror(errno);
      continue;
    }
    // Like TCPStore's own listener: a restarted job must not wait out
    // TIME_WAIT on the port.
    int on = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
    if (::bind(fd.get(), a->ai_addr, a->ai_addrlen) != 0) {
      if (errno == EADDRINUSE) {
        throwNetworkError(
            fmt::format(
                "tcpstore_port {} on master_address '{}' is already in use",
                port,
                host));
      }
      lastError = std::strerror(errno);
      continue;
    }
    if (::listen(fd.get(), SOMAXCONN) != 0) {
      lastError = std::strerror(errno);
      continue;
    }
    return fd;
  }
  throwNetworkError(
      fmt::format(
          "cannot listen on master_address '{}' tcpstore_port {}: {}",
          host,
          port,
          lastError));
}

UniqueFd connectSocket(
    const std::string& host,
    uint16_t port,
    std::chrono::steady_clock::time_point deadline) {
  using namespace std::chrono;
  using Clock = steady_clock;
  milliseconds backoff{10};
  std::string lastError = "timed out";
  for (;;) {
    if (AddrInfoPtr addresses = resolve(host, port, 0)) {
      for (addrinfo* a = addresses.get(); a != nullptr; a = a->ai_next) {
        const auto left = ceil<milliseconds>(deadline - Clock::now());
        UniqueFd fd =
            tryConnect(*a, std::max(left, milliseconds(1)), lastError);
        if (fd.get() >= 0) {
          return fd;
        }
      }
    } else {
      lastError = fmt::format(
          "master_address '{}' does not resolve: the name server is not "
          "answering",
          host);
    }
    const auto left = deadline - Clock::now();
    if (left <= Clock::duration::zero()) {
      throwNetworkError(lastError);
    }
    // The host may not be listening yet: rank 0 starts when it starts.
    std::this_thread::sleep_for(std::min<Clock::duration>(backoff, left));
    backoff = std::min(backoff * 2, milliseconds(250));
  }
}

void tuneStoreSocket(int fd, std::chrono::milliseconds silenceLimit) {
  const int on = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
  // Keepalive notices a host that vanished while the connection idles, and
  // TCP_USER_TIMEOUT one that stopped acknowledging what we sent: the
  // kernel then fails the socket instead of retransmitting for 15 minutes.
  // A frozen process whose kernel still acknowledges is caught by our own
  // reply deadlines.
  ::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof(on));
  const int idleSecs =
      static_cast<int>(std::max<int64_t>(1, silenceLimit.count() / 2000));
  const int intervalSecs = 1;
  const int probes = 3;
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idleSecs, sizeof(idleSecs));
  ::setsockopt(
      fd, IPPROTO_TCP, TCP_KEEPINTVL, &intervalSecs, sizeof(intervalSecs));
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &probes, sizeof(probes));
  const unsigned int userTimeoutMs =
      static_cast<unsigned int>(silenceLimit.count());
  ::setsockopt(
      fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &userTimeoutMs, sizeof(userTimeoutMs));
}

std::string localAddress(int fd) {
  sockaddr_storage address{};
  socklen_t length = sizeof(address);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    throwNetworkError(
        fmt::format("getsockname failed: {}", std::strerror(errno)));
  }
  char text[INET6_ADDRSTRLEN] = {};
  const void* raw =
      address.ss_family == AF_INET6
          ? static_cast<const void*>(
                &reinterpret_cast<const sockaddr_in6*>(&address)->sin6_addr)
          : static_cast<const void*>(
                &reinterpret_cast<const sockaddr_in*>(&address)->sin_addr);
  ::inet_ntop(address.ss_family, raw, text, sizeof(text));
  return text;
}

uint16_t localPort(int fd) {
  sockaddr_storage address{};
  socklen_t length = sizeof(address);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    throwNetworkError(
        fmt::format("getsockname failed: {}", std::strerror(errno)));
  }
  return ntohs(
      address.ss_family == AF_INET6
          ? reinterpret_cast<const sockaddr_in6*>(&address)->sin6_port
          : reinterpret_cast<const sockaddr_in*>(&address)->sin_port);
}

} // namespace tcpstore_barrier
