#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace tcpstore_barrier {

// Owns a file descriptor until it is released to a new owner.
class UniqueFd {
 public:
  explicit UniqueFd(int fd = -1) noexcept : fd_(fd) {}
  ~UniqueFd();
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int get() const noexcept {
    return fd_;
  }
  int release() noexcept {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

// A listening TCP socket bound to `host`'s address (not the wildcard), for
// TCPStoreOptions::masterListenFd. Throws c10::DistNetworkError naming the
// host and port when the name does not resolve or the port is taken.
UniqueFd openListenSocket(const std::string& host, uint16_t port);

// A non-blocking TCP connection to `host`:`port`, retrying refused
// connections with short back-offs until `deadline`. A name that does not
// resolve fails at once. Throws c10::DistNetworkError with the last cause.
UniqueFd connectSocket(
    const std::string& host,
    uint16_t port,
    std::chrono::steady_clock::time_point deadline);

// The address (numeric) and port a socket is bound to locally: for a
// connection, the address this host uses to reach its peer.
std::string localAddress(int fd);
uint16_t localPort(int fd);

// Options of a store connection: no Nagle delay, and kernel-level failure
// detection scaled to `silenceLimit`.
void tuneStoreSocket(int fd, std::chrono::milliseconds silenceLimit);

} // namespace tcpstore_barrier
