#include "sockets.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <thread>

#include <c10/util/Exception.h>
#include <c10/util/Logging.h>
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

UniqueFd makeEventFd() {
  return UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
}

void postEvent(int eventFd) noexcept {
  const uint64_t one = 1;
  [[maybe_unused]] const auto written = ::write(eventFd, &one, sizeof(one));
}

namespace {

bool isLoopback(const sockaddr* address) {
  if (address->sa_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(address);
    return (ntohl(in->sin_addr.s_addr) >> 24) == 127;
  }
  if (address->sa_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(address);
    return IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr) ||
           (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr) &&
            in6->sin6_addr.s6_addr[12] == 127);
  }
  return false;
}

std::string numericText(const sockaddr* address, socklen_t length) {
  char text[NI_MAXHOST] = {};
  if (::getnameinfo(
          address, length, text, sizeof(text), nullptr, 0, NI_NUMERICHOST) !=
      0) {
    return "?";
  }
  return text;
}

bool isNumericHost(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_flags = AI_NUMERICHOST;
  addrinfo* found = nullptr;
  if (::getaddrinfo(host.c_str(), nullptr, &hints, &found) != 0) {
    return false;
  }
  ::freeaddrinfo(found);
  return true;
}

// The names that mean "this machine only", whatever /etc/hosts says.
bool isLocalhostName(std::string host) {
  std::transform(host.begin(), host.end(), host.begin(), [](unsigned char c) {
    return static_cast<char>(std::tolower(c));
  });
  while (!host.empty() && host.back() == '.') {
    host.pop_back();
  }
  const std::string suffix = ".localhost";
  return host == "localhost" || host == "localhost.localdomain" ||
         host == "localhost6" || host == "localhost6.localdomain6" ||
         host == "ip6-localhost" || host == "ip6-loopback" ||
         (host.size() > suffix.size() &&
          host.compare(host.size() - suffix.size(), suffix.size(), suffix) ==
              0);
}

// Binds and listens; an invalid fd (and `error`) if this address cannot be
// used here. A port in use is an error of its own.
UniqueFd bindAndListen(
    const sockaddr* address,
    socklen_t length,
    const std::string& host,
    uint16_t port,
    std::string& error) {
  UniqueFd fd(::socket(address->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (fd.get() < 0) {
    error = std::strerror(errno);
    return UniqueFd();
  }
  // Like TCPStore's own listener: a restarted job must not wait out
  // TIME_WAIT on the port.
  int on = 1;
  ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
  if (address->sa_family == AF_INET6) {
    // The IPv6 wildcard takes IPv4 connections too, as TCPStore's does.
    int off = 0;
    ::setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof(off));
  }
  if (::bind(fd.get(), address, length) != 0) {
    if (errno == EADDRINUSE) {
      throwNetworkError(
          fmt::format(
              "tcpstore_port {} on master_address '{}' is already in use",
              port,
              host));
    }
    error = std::strerror(errno);
    return UniqueFd();
  }
  if (::listen(fd.get(), SOMAXCONN) != 0) {
    error = std::strerror(errno);
    return UniqueFd();
  }
  return fd;
}

// Every address of this host: the IPv6 wildcard (dual stack), else IPv4's.
UniqueFd listenOnWildcard(const std::string& host, uint16_t port) {
  std::string error;
  sockaddr_in6 any6{};
  any6.sin6_family = AF_INET6;
  any6.sin6_addr = in6addr_any;
  any6.sin6_port = htons(port);
  UniqueFd fd = bindAndListen(
      reinterpret_cast<const sockaddr*>(&any6),
      sizeof(any6),
      host,
      port,
      error);
  if (fd.get() >= 0) {
    return fd;
  }
  sockaddr_in any4{};
  any4.sin_family = AF_INET;
  any4.sin_addr.s_addr = htonl(INADDR_ANY);
  any4.sin_port = htons(port);
  fd = bindAndListen(
      reinterpret_cast<const sockaddr*>(&any4),
      sizeof(any4),
      host,
      port,
      error);
  if (fd.get() < 0) {
    throwNetworkError(
        fmt::format(
            "cannot listen on every address for master_address '{}' "
            "tcpstore_port {}: {}",
            host,
            port,
            error));
  }
  return fd;
}

} // namespace

UniqueFd openListenSocket(const std::string& host, uint16_t port) {
  AddrInfoPtr addresses = resolve(host, port, AI_ADDRCONFIG);
  if (!addresses) {
    throwNetworkError(
        fmt::format(
            "master_address '{}' does not resolve: the name server is not "
            "answering",
            host));
  }

  // A name other than localhost's that is loopback here is this host's own
  // name on a Debian-default host (127.0.1.1): the other hosts resolve it
  // to an address of this host that nothing here names, so only the
  // wildcard reaches both them and this host.
  if (!isNumericHost(host) && !isLocalhostName(host)) {
    for (addrinfo* a = addresses.get(); a != nullptr; a = a->ai_next) {
      if (isLoopback(a->ai_addr)) {
        UniqueFd fd = listenOnWildcard(host, port);
        LOG(WARNING) << "TCPStoreBarrier: master_address '" << host
                     << "' is the loopback address "
                     << numericText(a->ai_addr, a->ai_addrlen)
                     << " on this host, so rank 0's store listens on every "
                        "address of this host (port "
                     << localPort(fd.get())
                     << "), as torch's TCPStore does; pass an address of "
                        "the job's network as master_address to listen "
                        "there only";
        return fd;
      }
    }
  }

  // Peers connect to the first address the name resolves to, so bind that
  // one; the next is only a fallback when this host cannot use it.
  std::string lastError;
  for (addrinfo* a = addresses.get(); a != nullptr; a = a->ai_next) {
    UniqueFd fd =
        bindAndListen(a->ai_addr, a->ai_addrlen, host, port, lastError);
    if (fd.get() >= 0) {
      return fd;
    }
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
    std::chrono::steady_clock::time_point deadline,
    const std::vector<std::string>& otherHosts,
    Refused refused) {
  using namespace std::chrono;
  using Clock = steady_clock;
  // With other addresses to try, one that swallows connection attempts
  // (filtered, unrouted) must not use up the whole deadline.
  constexpr milliseconds kPerAddress{1000};
  std::vector<std::string> hosts{host};
  hosts.insert(hosts.end(), otherHosts.begin(), otherHosts.end());
  milliseconds backoff{10};
  std::string lastError = "timed out";
  for (;;) {
    for (const auto& candidate : hosts) {
      AddrInfoPtr addresses;
      try {
        addresses = resolve(candidate, port, 0);
      } catch (const c10::DistNetworkError&) {
        if (hosts.size() == 1) {
          throw;
        }
        lastError = fmt::format("'{}' does not resolve", candidate);
        continue;
      }
      if (!addresses) {
        lastError = fmt::format(
            "master_address '{}' does not resolve: the name server is not "
            "answering",
            candidate);
        continue;
      }
      for (addrinfo* a = addresses.get(); a != nullptr; a = a->ai_next) {
        auto left = ceil<milliseconds>(deadline - Clock::now());
        if (hosts.size() > 1) {
          left = std::min(left, kPerAddress);
        }
        std::string error;
        UniqueFd fd = tryConnect(*a, std::max(left, milliseconds(1)), error);
        if (fd.get() >= 0) {
          return fd;
        }
        lastError =
            hosts.size() > 1
                ? fmt::format(
                      "{} ({})", error, numericText(a->ai_addr, a->ai_addrlen))
                : error;
      }
    }
    const auto left = deadline - Clock::now();
    if (left <= Clock::duration::zero() || refused == Refused::kFinal) {
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
  // getnameinfo writes a link-local address's scope as `%interface`, which
  // getaddrinfo reads back.
  return numericText(reinterpret_cast<const sockaddr*>(&address), length);
}

std::string peerAddress(int fd) {
  sockaddr_storage address{};
  socklen_t length = sizeof(address);
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    return {};
  }
  return numericText(reinterpret_cast<const sockaddr*>(&address), length);
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
