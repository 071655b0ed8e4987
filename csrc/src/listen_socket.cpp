#include "listen_socket.h"

#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <string>

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
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | AI_ADDRCONFIG;
  addrinfo* found = nullptr;
  const std::string service = std::to_string(port);
  if (int rc = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &found);
      rc != 0) {
    throwNetworkError(fmt::format(
        "master_address '{}' does not resolve: {}", host, gai_strerror(rc)));
  }
  std::unique_ptr<addrinfo, AddrInfoDeleter> addresses(found);

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
        throwNetworkError(fmt::format(
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
  throwNetworkError(fmt::format(
      "cannot listen on master_address '{}' tcpstore_port {}: {}",
      host,
      port,
      lastError));
}

} // namespace tcpstore_barrier
